"""node.yaml validation: defaults, and errors that name the key and the line."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dicom_ai_node.config import ConfigError, NodeConfig, load_config, parse_config, with_overrides
from dicom_ai_node.service import load_pipelines


def test_embedded_defaults():
    config = NodeConfig()
    assert config.node.ae_title == "DICOM_AI_NODE"
    assert config.node.port == 11112
    assert config.node.data_dir == Path("./var")
    assert config.completion.quiet_period_s == 60
    assert config.peers == []
    assert "ct_lung" in load_pipelines(config)


def test_overrides_are_validated():
    config = with_overrides(NodeConfig(), port=4242, ae_title="AI", data_dir=Path("/tmp/x"))
    assert (config.node.port, config.node.ae_title, config.node.data_dir) == (4242, "AI", Path("/tmp/x"))
    with pytest.raises(ConfigError, match="node.port"):
        with_overrides(NodeConfig(), port=70000)


BAD = """\
node:
  ae_title: THIS_AE_TITLE_IS_FAR_TOO_LONG
  port: 11112
peers:
  - ae_title: PACS
    host: 10.0.0.5
    port: 104
rules:
  - name: chest
    match:
      Modality: CT
      BodyPartExamind: CHEST
    pipelines: [ct_lung]
  - name: other
    pipelines: [ct_lung]
    destinations: [NOWHERE]
"""


def test_errors_name_key_and_line():
    with pytest.raises(ConfigError) as info:
        parse_config(BAD, "node.yaml")
    text = str(info.value)
    assert "node.yaml:2: node.ae_title" in text
    assert "node.yaml:10: rules.0.match" in text and "BodyPartExamind" in text


def test_unknown_destination_is_reported():
    text = BAD.replace("THIS_AE_TITLE_IS_FAR_TOO_LONG", "AI").replace("BodyPartExamind", "BodyPartExamined")
    with pytest.raises(ConfigError, match="destination 'NOWHERE' is not a configured peer"):
        parse_config(text, "node.yaml")


def test_yaml_syntax_error_has_line():
    with pytest.raises(ConfigError, match=r"node.yaml:2: not valid YAML"):
        parse_config("node:\n  port: 1: 2\n  ae_title: X\n", "node.yaml")


def test_unknown_section():
    with pytest.raises(ConfigError, match="node.yaml:1: nodes: Extra inputs are not permitted"):
        parse_config("nodes: {}\n", "node.yaml")


def test_check_config_cli(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("node: {port: 4242}\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD)
    cli = [sys.executable, "-m", "dicom_ai_node.cli", "check-config"]
    ok = subprocess.run(cli + [str(good)], capture_output=True, text=True)
    assert ok.returncode == 0 and "OK" in ok.stdout
    failed = subprocess.run(cli + [str(bad)], capture_output=True, text=True)
    assert failed.returncode == 2
    assert f"{bad}:2: node.ae_title" in failed.stderr


def test_example_config_in_deploy_is_valid():
    example = Path(__file__).resolve().parent.parent / "deploy" / "node.yaml"
    config = load_config(example)
    load_pipelines(config)


def test_key_given_twice_is_an_error():
    with pytest.raises(ConfigError, match=r"node.yaml:3: not valid YAML: key 'port' given twice \(first on line 2\)"):
        parse_config("node:\n  port: 1\n  port: 2\n", "node.yaml")
