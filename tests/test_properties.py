"""The YAML defaults: one folder, properties/ at the top level, read by the package at one path in a checkout and
an install alike."""

import configparser
import fnmatch
import os

from recbole_dccl.defaults import PROPERTIES_DIR

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)


def test_the_package_reads_the_top_level_properties_in_a_checkout():
    assert os.path.samefile(PROPERTIES_DIR, os.path.join(ROOT, "properties"))


def test_an_install_carries_every_yaml_file_of_properties():
    setup = configparser.ConfigParser()
    setup.read(os.path.join(ROOT, "setup.cfg"))
    assert "recbole_dccl.properties" in setup["options"]["packages"].split()
    patterns = [pattern.strip() for pattern in setup["options.package_data"]["recbole_dccl.properties"].split(",")]
    folder = os.path.join(ROOT, "properties")
    files = [
        os.path.relpath(os.path.join(path, name), folder)
        for path, _, names in os.walk(folder) for name in names if name.endswith(".yaml")
    ]
    assert files and [name for name in files if not any(fnmatch.fnmatch(name, p) for p in patterns)] == []
