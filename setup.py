from setuptools import find_packages, setup

with open("README.rst", encoding="utf-8") as f:
    README = f.read()

setup(
    name="llmproxy",
    version="0.1.0",
    description="A Twisted reverse proxy for LLM provider APIs with short-lived withering tokens.",
    long_description=README,
    long_description_content_type="text/x-rst",
    license="MIT",
    python_requires=">=3.11",
    # twisted.plugins is listed explicitly: it has no __init__.py and must not get one.
    packages=find_packages(include=["llmproxy", "llmproxy.*"]) + ["twisted.plugins"],
    package_data={"llmproxy": ["py.typed", "data/*.yaml"]},
    include_package_data=True,
    install_requires=[
        "twisted[tls]>=24.7",
        "klein>=24.8",
        "treq>=24.9",
        "txredisapi>=1.4.10",
        "attrs>=23.1",
        "pyyaml>=6.0",
        "sqlalchemy>=2.0",
        "alembic>=1.13",
        "psycopg[binary]>=3.1",
        "pymysql>=1.1",
        "cryptography>=42",
        "prometheus-client>=0.20",
        "bpe-openai>=0.1",
    ],
    extras_require={
        "test": ["openai>=1.40", "coverage>=7.10", "openapi-spec-validator>=0.7"],
        "bench": ["matplotlib>=3.8"],
    },
    entry_points={"console_scripts": ["llmproxy = llmproxy.cli:main"]},
    classifiers=[
        "Framework :: Twisted",
        "Programming Language :: Python :: 3",
    ],
)
