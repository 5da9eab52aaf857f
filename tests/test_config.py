"""Config precedence (defaults < environment < flags) and the README's tables staying in step with the code."""

import argparse

import pytest

from minedraft import config
from minedraft.config import ModelServiceConfig, RouterConfig


def parse(cls, argv):
    p = argparse.ArgumentParser()
    config.add_arguments(p, cls)
    return p.parse_args(argv)


def test_precedence():
    env = {"MINEDRAFT_ROUTER_MAX_BATCH_SIZE": "8", "MINEDRAFT_ROUTER_MODE": "sd"}
    cfg = config.load(RouterConfig, "ROUTER", parse(RouterConfig, ["--mode", "ar"]), env)
    assert cfg.max_batch_size == 8 and cfg.mode == "ar" and cfg.port == 50051


def test_role_defaults():
    d = config.load(ModelServiceConfig, "DRAFTER", parse(ModelServiceConfig, []), {}).resolved("drafter")
    v = config.load(ModelServiceConfig, "VERIFIER", parse(ModelServiceConfig, []), {}).resolved("verifier")
    assert (d.port, d.cpu_core, d.model) == (50061, 0, config.DEMO_DRAFT)
    assert (v.port, v.cpu_core, v.model) == (50062, 1, config.DEMO_TARGET)


def test_bad_mode_rejected():
    with pytest.raises(ValueError, match="mode"):
        RouterConfig(mode="fast").resolved()


def test_readme_tables_are_current():
    readme = (config.REPO_ROOT / "README.md").read_text()
    assert config.config_table(RouterConfig, "ROUTER") in readme
    assert config.config_table(ModelServiceConfig, "VERIFIER") in readme
