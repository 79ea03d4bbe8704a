from setuptools import Extension, find_packages, setup

# torch/torchvision are pinned to the releases whose wheels this project's machines carry;
# `make setup` installs them first so pip never downloads another build.
install_requires = [
    "torch==2.14.1",
    "torchvision==0.29.1",
    "numpy>=1.24",
    "pillow>=10",
    "pyyaml>=6",
    "tqdm>=4.60",
    "accelerate>=1.0",
    "matplotlib>=3.7",
    "tensorboard>=2.14",
]

extras = {
    "dali": ["nvidia-dali-cuda130"],
    "ffcv": ["ffcv", "opencv-python-headless"],
    "wds": ["webdataset>=0.2"],
    "vit": ["timm>=1.0"],
    "bench": ["kornia>=0.7"],
    # the torch backend's fast CPU path: OpenCV resize/augment, simplejpeg's libjpeg-turbo decode,
    # numba's fused colour chain and normalisation (loaders.augment.fused_colour / fused_normalize)
    "fast": ["opencv-python-headless", "simplejpeg>=1.7", "numba>=0.58"],
    # log.wandb: offline | online (fastssl.metrics_log)
    "wandb": ["wandb>=0.16"],
    # fastssl sweep / study --launcher local-jobs | slurm (fastssl.studies.launchers)
    "sweep": ["submitit>=1.5"],
    # shards in object storage (type: shards with s3:// / gs:// / https:// URLs; loaders.remote)
    "remote": ["fsspec>=2023.1", "s3fs>=2023.1", "aiohttp>=3.8"],
    "gcs": ["gcsfs>=2023.1"],
    # 100M-row CSV / Parquet file lists read column-wise into compact arrays (loaders.lists)
    "lists": ["pyarrow>=14"],
    # moto[server]: a real S3-protocol server on loopback for the remote-shard tests
    "dev": ["pytest>=8", "pytest-timeout", "scipy>=1.10", "webdataset>=0.2", "timm>=1.0", "ruff==0.17.6",
            "moto[server]>=5"],
}
# `all` is what `make setup` installs; gcsfs (Google's auth stack) stays opt-in: the tests use S3
extras["all"] = sorted({p for k, v in extras.items() if k != "gcs" for p in v})

# region JPEG decode (loaders/_jpeg_region.c, against the system libjpeg-turbo: Debian's libjpeg-dev,
# which `make setup` installs): decodes only the rows/columns a sample's views need. Optional: where it
# cannot build, reduced-scale decode falls back to whole-image decode (loaders.decode.region_available)
ext_modules = [Extension("loaders._jpeg_region", ["loaders/_jpeg_region.c"], libraries=["jpeg"],
                         extra_compile_args=["-O2"], optional=True)]

setup(
    name="fastssl",
    version="0.1.0",
    description="Self-supervised visual pretraining built around a fast, exact data path",
    # the top-level configs/ folder (augment presets, method/data/recipe configs) is also shipped
    # as package data at loaders/configs/, where loaders.config_files.config_root() finds it in
    # an installed copy; a checkout reads configs/ itself
    packages=[*find_packages(include=["fastssl", "fastssl.*", "loaders", "loaders.*", "benchmarks"]),
              "loaders.configs"],
    package_dir={"loaders.configs": "configs"},
    package_data={"loaders.configs": ["*.yaml", "*/*.yaml"]},
    python_requires=">=3.10",
    install_requires=install_requires,
    extras_require=extras,
    entry_points={"console_scripts": ["fastssl=fastssl.cli:main"]},
    ext_modules=ext_modules,
)
