"""Memory per GPU of a full fine-tune: bytes per parameter measured on a small model (the
tensors a training step keeps: weights, gradients, AdamW's two moments), and the table for the
Dolly sizes at 1, 2, 4 and 8 GPUs under each sharding option, from that arithmetic.

    python -m benchmarks.train_memory      (prints a Markdown table; seconds on a CPU)

Activations, the CUDA context and allocator slack come on top (activation checkpointing, on for
GPUs, keeps the activations to a layer's inputs)."""
from __future__ import annotations

import torch

SIZES = {"dolly-v2-3b (2.8B)": 2.8e9, "dolly-v2-7b (6.9B)": 6.9e9, "dolly-v2-12b (12B)": 12e9}
GPUS = (1, 2, 4, 8)


def measured_bytes_per_parameter() -> float:
    """Bytes of weights + gradients + optimizer state per parameter after one AdamW step of a
    small GPT-NeoX (fp32 weights, as the job loads them; bf16 autocast does not change what is kept)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=1024, hidden_size=256, num_hidden_layers=4,
                                             num_attention_heads=4, intermediate_size=1024))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(0, 1024, (2, 32))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    params = sum(p.numel() for p in model.parameters())
    kept = sum(p.numel() * p.element_size() for p in model.parameters())
    kept += sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    kept += sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                if torch.is_tensor(t) and t.dim() > 0)
    return kept / params


def table(bytes_per_param: float) -> str:
    # On the GPU, per parameter: none (DDP) keeps everything on each GPU; fsdp / zero3 shard it
    # over N GPUs; zero3 with the optimizer offloaded keeps only 16-bit weights and gradients
    # (4 bytes) on the GPUs, sharded; fsdp's offload moves weights and optimizer to the CPU
    # (about 0 kept between layers: only the layer being computed, gathered).
    optimizer_share = 8 / 16 * bytes_per_param + 4 / 16 * bytes_per_param  # fp32 master + 2 moments
    rows = ["| model | sharding | " + " | ".join(f"{n} GPU" for n in GPUS) + " |",
            "|---|---|" + "---:|" * len(GPUS)]
    for name, params in SIZES.items():
        options = {"none (DDP)": lambda n: bytes_per_param * params,
                   "fsdp / zero3": lambda n: bytes_per_param * params / n,
                   "zero3 + offload_optimizer": lambda n: (bytes_per_param - optimizer_share) * params / n}
        for option, per_gpu in options.items():
            rows.append(f"| {name} | {option} | " + " | ".join(f"{per_gpu(n) / 1e9:.0f} GB" for n in GPUS) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    measured = measured_bytes_per_parameter()
    print(f"measured: {measured:.2f} bytes per parameter (weights, gradients, AdamW moments)\n")
    print(table(measured))
