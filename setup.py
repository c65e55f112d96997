from setuptools import find_packages, setup

setup(
    name="rtdist",
    version="0.1.0",
    description="Distributed training of Routing Transformers on very long sequences",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["rtdist", "rtdist.*"]),
    python_requires=">=3.10",
    # torch is a plain requirement so that an installed CUDA build is kept as it is.
    install_requires=[
        "torch>=2.1",
        "deepspeed>=0.14",
        "fairscale>=0.4.13",
        "webdataset>=0.2.86",
        "numpy",
        "pyyaml",
        "tqdm",
        "safetensors",
        "sentencepiece",
        "pillow",
        "tensorboard",  # event files of every run (rtdist.monitor)
        # corpora as they ship (tools/preprocess.py): .zst streams, parquet, tokenizer.json, URL inputs
        "zstandard",
        "isal",  # gzip inflate at about twice zlib's speed (rtdist.data.sources falls back to zlib without it)
        "pyarrow",
        "tokenizers",
        "fsspec>=2023.1",  # URL inputs and shards at URLs (rtdist/data/sources.py, rtdist/data/remote.py)
        "aiohttp",  # fsspec's http(s) filesystem
    ],
    entry_points={
        "console_scripts": [
            "rtdist-launch = rtdist.launcher:cli",
        ],
    },
    extras_require={
        # s3:// through fsspec (s3fs); gs:// needs gcsfs. http(s):// needs nothing more.
        "remote": ["s3fs>=2023.1"],
        "gcs": ["gcsfs>=2023.1"],
        # moto's standalone S3 server and boto3, and a GCS emulator with gcsfs, serve the streaming tests
        # (tests/object_servers.py).
        "dev": ["pytest>=7", "pytest-timeout", "matplotlib", "s3fs>=2023.1", "moto[server]>=5", "boto3",
                "gcsfs>=2023.1", "gcp-storage-emulator"],
        "mpi": ["mpi4py", "mpich"],
    },
)
