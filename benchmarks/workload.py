"""A seeded, synthetic support-ticket workload of mixed length, written from templates in this file.

Benchmarks need rows whose prompt lengths spread the way real tickets do (a one-line "can't log
in" next to a page-long bug report), because padding and batching costs depend on that spread.
No external data: every ticket is assembled from the vocabulary and sentence templates below,
so the same seed gives byte-identical tickets on any machine, GPU boxes without Spark included.
This module imports only the standard library.
"""
from __future__ import annotations

import math
import random

# The instruction every benchmark row is run with (the summarize job's default instruction).
INSTRUCTION = (
    "Summarize this customer support ticket in one or two sentences: what the customer needs, "
    "and how urgent it is."
)

# A long instruction (about 150 tokens), like a detailed triage rubric: the part of every prompt
# that all rows share grows threefold, which is what reusing the shared prefix saves.
LONG_INSTRUCTION = (
    "You are triaging customer support tickets for a software company. Read the ticket and write "
    "one or two sentences for the on-call engineer. Say which product and feature are affected, "
    "what the customer sees (an error code, a blank screen, a timeout, wrong numbers, duplicated "
    "entries), what they already tried, and how many people are blocked. Rate the urgency: urgent "
    "when payroll, a month-end close, an audit deadline or a customer demo is at risk, or when a "
    "whole team cannot work; high when a paid plan is degraded; normal when a workaround exists; "
    "low when the customer says it is not urgent. Do not invent details that are not in the "
    "ticket, do not apologize, do not address the customer, and do not repeat the ticket."
)

# A ticket's *prompt* (template + instruction + body) should span about 30 to 600 tokens. The
# template and instruction cost about 35 to 60 tokens depending on the tokenizer and format, so
# bodies are drawn between these token targets.
MIN_BODY_TOKENS = 4
MAX_BODY_TOKENS = 540
# BPE tokenizers of the size we use give about 1.3 to 1.5 tokens per English word with
# punctuation; the estimate only has to place lengths in the right range, not hit them.
TOKENS_PER_WORD = 1.4

PRODUCTS = ["PayDesk", "PulseBuds", "Taskory", "Lumina", "HearthLink", "CargoTrack", "NoteNest",
            "ShiftBoard", "ClearLedger", "StreamVault"]
PLANS = ["Free", "Starter", "Team", "Business", "Enterprise"]
PLATFORMS = ["Windows 11", "macOS 14", "Ubuntu 22.04", "iOS 17", "Android 14", "Chrome on a Chromebook"]
FEATURES = ["invoice export", "calendar sync", "single sign-on", "the mobile app", "bulk import",
            "the reporting dashboard", "two-factor login", "webhook delivery", "offline mode",
            "shared folders", "the billing page", "push notifications", "the search bar"]
SYMPTOMS = ["shows a blank screen", "times out after about thirty seconds", "returns error {code}",
            "logs me out immediately", "duplicates every entry", "never finishes loading",
            "crashes without any message", "shows numbers that do not match our records",
            "sends the same email twice", "silently drops the last few rows"]
ACTIONS = ["cleared the browser cache", "reinstalled the app", "tried a different network",
           "restarted the device", "logged out and back in", "asked a colleague to try from their account",
           "waited a full day in case it was an outage", "checked the status page",
           "followed the steps in your help article", "disabled our VPN"]
IMPACTS = ["our month-end close is blocked", "twenty people on my team cannot work",
           "a customer demo is scheduled for tomorrow morning", "we are being charged for seats we do not use",
           "payroll has to go out on Friday", "it is not urgent but it is annoying",
           "our auditors need the export by the end of the week", "we might have to cancel our subscription"]
OPENERS = ["Hello,", "Hi team,", "Good morning,", "hi", "Dear support,", "Hey there,", ""]
CLOSERS = ["Thanks for your help.", "Please advise.", "Looking forward to your reply.",
           "Thank you.", "Any help is appreciated!", "Regards, {name}", ""]
NAMES = ["Ana", "Bilal", "Chen", "Dmitri", "Esther", "Farid", "Greta", "Hiro", "Ines", "Jonas"]

SENTENCES = [
    "When I open {feature} in {product} it {symptom}.",
    "Since {day}, {feature} {symptom} for everyone on our {plan} plan.",
    "I already {action} and {action2}, but nothing changed.",
    "We are on {platform} and the problem started right after the last update.",
    "The order number is {order} and the amount was ${amount}.",
    "This matters because {impact}.",
    "Could you check whether something changed on your side around {time} on {day}?",
    "My colleague {name} sees the same thing when she uses {feature}.",
    "The error message says \"{code}: request could not be completed\".",
    "We were charged ${amount} twice for invoice INV-{invoice}.",
    "It worked fine until {day}, and we did not change any settings.",
    "Steps to reproduce: open {product}, go to {feature}, wait a few seconds, and it {symptom}.",
    "I attached a screenshot, although it only shows that it {symptom}.",
    "Is there a workaround we can use until this is fixed?",
    "Our account email is {email} in case you need to look us up.",
]
# What the shortest tickets say, whole: a real queue has many of these.
ONE_LINERS = ["cant log in", "Charged twice, please refund.", "{product} app crashes on start.",
              "Where is my order {order}?", "How do I cancel my {plan} plan?", "export broken again",
              "Password reset email never arrives.", "{feature} is down for us"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "last week", "yesterday", "the 3rd"]


def _estimate_tokens(text: str) -> int:
    return math.ceil(len(text.split()) * TOKENS_PER_WORD)


def _sentence(rng: random.Random, product: str) -> str:
    template = rng.choice(SENTENCES)
    first, second = rng.sample(ACTIONS, 2)
    return template.format(
        feature=rng.choice(FEATURES), product=product, plan=rng.choice(PLANS),
        symptom=rng.choice(SYMPTOMS).format(code=f"E{rng.randint(100, 999)}"),
        action=first, action2=second, platform=rng.choice(PLATFORMS), day=rng.choice(DAYS),
        order=f"{product[:2].upper()}-{rng.randint(10000, 99999)}", amount=f"{rng.randint(9, 2400)}.{rng.randint(0, 99):02d}",
        impact=rng.choice(IMPACTS), time=f"{rng.randint(1, 12)}:{rng.randint(0, 59):02d} {rng.choice(['am', 'pm'])}",
        name=rng.choice(NAMES), code=f"E{rng.randint(100, 999)}", invoice=f"{rng.randint(20250101, 20261231)}-{rng.randint(1, 9999):04d}",
        email=f"{rng.choice(NAMES).lower()}@example.com",
    )


def ticket_body(rng: random.Random, target_tokens: int) -> str:
    """One ticket body of roughly ``target_tokens`` tokens: an opener, sentences grouped into
    paragraphs until the target is reached, and a closer."""
    product = rng.choice(PRODUCTS)
    if target_tokens < 12:
        return rng.choice(ONE_LINERS).format(product=product, plan=rng.choice(PLANS), feature=rng.choice(FEATURES),
                                             order=f"{product[:2].upper()}-{rng.randint(10000, 99999)}")
    opener = rng.choice(OPENERS)
    closer = rng.choice(CLOSERS).format(name=rng.choice(NAMES))
    budget = target_tokens - _estimate_tokens(opener) - _estimate_tokens(closer)
    paragraphs: list[list[str]] = [[]]
    used = 0
    # At least one sentence, so even the shortest ticket says what is wrong.
    while used < budget or not paragraphs[0]:
        sentence = _sentence(rng, product)
        paragraphs[-1].append(sentence)
        used += _estimate_tokens(sentence)
        if len(paragraphs[-1]) >= rng.randint(2, 5):
            paragraphs.append([])
    text = "\n\n".join(" ".join(p) for p in paragraphs if p)
    return "\n\n".join(part for part in (opener, text, closer) if part)


def generate_tickets(count: int, seed: int = 0, min_body_tokens: int = MIN_BODY_TOKENS,
                     max_body_tokens: int = MAX_BODY_TOKENS) -> list[tuple[str, str]]:
    """``count`` synthetic tickets as (ticket_id, body), the same for the same arguments.

    Body lengths are drawn log-uniformly between the two targets, so short tickets are as common
    as long ones on a log scale, like a real queue: many one-liners, a tail of long reports.
    """
    rng = random.Random(seed)
    low, high = math.log(min_body_tokens), math.log(max_body_tokens)
    tickets = []
    for index in range(count):
        target = int(round(math.exp(rng.uniform(low, high))))
        tickets.append((f"T-{seed}-{index:05d}", ticket_body(rng, target)))
    return tickets


def tokenizer_corpus(seed: int = 10_000, count: int = 400) -> list[str]:
    """Texts to train a benchmark's local tokenizer on: tickets from a seed the benchmark rows do
    not use, plus the instruction, so the tokenizer has not memorised the measured rows."""
    return [body for _, body in generate_tickets(count, seed)] + [INSTRUCTION]
