"""The command line as an operator uses it: demo against a running node, status, test-rule."""
from __future__ import annotations

import subprocess
import sys

import pytest

from dicom_ai_node.phantom import make_chest_phantom

CLI = [sys.executable, "-m", "dicom_ai_node.cli"]


@pytest.mark.integration
def test_demo_pushes_phantom_and_results_reach_the_outbox(start_node):
    node = start_node()  # no peers: loopback only, results to the outbox
    data_dir = str(node.config.node.data_dir)
    run = subprocess.run(CLI + ["demo", "--port", str(node.port), "--data-dir", data_dir, "--timeout", "180"],
                         capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "stored 121/121 instances" in run.stdout  # the chest CT and the chest radiograph
    assert "Right lung: Volume" in run.stdout and "Left lung: Volume" in run.stdout
    assert "Finding = Pulmonary nodule" in run.stdout and "Probability = " in run.stdout
    outbox = sorted(node.config.outbox_dir.rglob("*.dcm"))
    assert len(outbox) == 5  # lungs: SEG, SR, key image; radiograph: SR, Grad-CAM heatmap
    status = subprocess.run(CLI + ["status", "--data-dir", data_dir], capture_output=True, text=True, timeout=60)
    assert status.returncode == 0
    assert "routed" in status.stdout and " done " in status.stdout
    assert "sent 3/3" in status.stdout and "sent 2/2" in status.stdout


def test_test_rule_explains_decisions(tmp_path):
    phantom = make_chest_phantom(slices=20, size=64, pixel_spacing_mm=6.0, slice_thickness_mm=15.0, uid_seed="rule")
    phantom.write(tmp_path / "series")
    fired = subprocess.run(CLI + ["test-rule", str(tmp_path / "series")], capture_output=True, text=True, timeout=60)
    assert fired.returncode == 0, fired.stderr
    assert "rule 'chest-ct-lungs' does not fire" in fired.stdout  # 15 mm slices are outside "<=5"
    assert "SliceThickness: is '15', wanted <= 5" in fired.stdout
    assert "=> no pipeline runs" in fired.stdout
    thin = make_chest_phantom(slices=20, size=64, pixel_spacing_mm=6.0, slice_thickness_mm=2.5, uid_seed="thin")
    thin.write(tmp_path / "thin")
    fires = subprocess.run(CLI + ["test-rule", str(tmp_path / "thin")], capture_output=True, text=True, timeout=60)
    assert "rule 'chest-ct-lungs' FIRES" in fires.stdout and "=> ct_lung" in fires.stdout
