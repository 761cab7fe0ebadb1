"""Every package folder is listed in pyproject: one left out imports in editable mode but
is missing from the wheel."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_package_folder_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping = config["package-dir"]
    found = set()
    for name, folder in mapping.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([name, *rel.parts]))
    data_dirs = {f"{pkg}" for pkg in config.get("package-data", {})}
    assert found - data_dirs <= set(config["packages"]), found - set(config["packages"])
    assert set(mapping) == {"edgeswarm", "edgeswarm.placement", "edgeswarm.models",
                            "edgeswarm.device_agent"}
    # package-data folders must be packages too, or the wheel drops their files
    assert data_dirs <= set(config["packages"])
