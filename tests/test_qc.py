"""Input QC refusals: the contrast phase check, the reasons a refusal carries, the qc config section, and what
a job does with a refusal (a no-result SR, or a failure with every reason)."""
from __future__ import annotations

import pickle
from pathlib import Path

import pydicom
import pytest

from conftest import free_port, node_config, require_tool
from dicom_ai_node.config import ConfigError, NodeConfig, parse_config
from dicom_ai_node.imaging.qc import InputRejected, contrast_phase, input_problems
from dicom_ai_node.imaging.volume import VolumeError, load_volume
from dicom_ai_node.jobs.executor import JobRunner, JobSpec, OutputProfile, check_input
from dicom_ai_node.phantom import make_chest_phantom
from dicom_ai_node.pipeline import Accepts, ManifestError, discover, load_manifest
from dicom_ai_node.results.no_result import no_result_reasons
from dicom_ai_node.results.validate import check_result

REPO = Path(__file__).resolve().parent.parent
NO_TAGS = ("none of ContrastBolusAgent (0018,0010), ContrastBolusRoute (0018,1040), "
           "ContrastBolusStartTime (0018,1042) is present")


def small_series(folder: Path, seed: str, slices: int = 24, **tags: str) -> list[Path]:
    phantom = make_chest_phantom(slices=slices, size=48, pixel_spacing_mm=3.0, slice_thickness_mm=5.0, uid_seed=seed)
    for ds in phantom.datasets:
        for keyword, value in tags.items():
            setattr(ds, keyword, value)
    return phantom.write(folder)


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> list[Path]:
    return small_series(tmp_path_factory.mktemp("plain"), "qc-plain")


# -- contrast phase ----------------------------------------------------------------------------------------


def test_a_header_without_contrast_tags_is_non_contrast(plain):
    volume = load_volume(plain)
    assert contrast_phase(volume.sources[0]) == "non-contrast"
    assert input_problems(volume, Accepts(modality=["CT"], contrast=["non-contrast"])) == []
    assert input_problems(volume, Accepts(modality=["CT"], contrast=["contrast"])) == [
        f"contrast phase non-contrast ({NO_TAGS}) is not one of contrast"]


@pytest.mark.parametrize("keyword, value, tag", [
    ("ContrastBolusAgent", "IOPAMIDOL 370", "ContrastBolusAgent (0018,0010)"),
    ("ContrastBolusRoute", "IV", "ContrastBolusRoute (0018,1040)"),
    ("ContrastBolusStartTime", "101500", "ContrastBolusStartTime (0018,1042)"),
])
def test_any_contrast_tag_makes_a_contrast_series_and_the_message_names_it(tmp_path, keyword, value, tag):
    volume = load_volume(small_series(tmp_path, f"qc-{keyword}", **{keyword: value}))
    assert contrast_phase(volume.sources[0]) == "contrast"
    assert input_problems(volume, Accepts(modality=["CT"], contrast=["contrast"])) == []
    problems = input_problems(volume, Accepts(modality=["CT"], contrast=["non-contrast"]))
    assert problems == [f"contrast phase contrast ({tag} is present) is not one of non-contrast"]
    assert value not in problems[0]  # the tag is named, its value (free text) is not repeated


@pytest.mark.parametrize("value", ["", "NONE", "no", "N/A"])
def test_an_empty_or_none_contrast_agent_is_non_contrast(tmp_path, value):
    volume = load_volume(small_series(tmp_path, f"qc-agent-{value}", slices=3, ContrastBolusAgent=value))
    assert contrast_phase(volume.sources[0]) == "non-contrast"


def test_no_contrast_list_accepts_both_phases(tmp_path, plain):
    contrast = load_volume(small_series(tmp_path, "qc-any", ContrastBolusAgent="IOHEXOL"))
    accepts = Accepts(modality=["CT"])
    assert input_problems(load_volume(plain), accepts) == input_problems(contrast, accepts) == []


def test_contrast_phase_is_checked_with_the_other_reasons(tmp_path):
    volume = load_volume(small_series(tmp_path, "qc-both", slices=10, ContrastBolusRoute="IV"))
    accepts = Accepts(modality=["CT"], min_slices=20, contrast=["non-contrast"])
    assert input_problems(volume, accepts) == [
        "10 slices, fewer than the 20 required",
        "contrast phase contrast (ContrastBolusRoute (0018,1040) is present) is not one of non-contrast",
    ]


def test_a_manifest_with_an_unknown_contrast_phase_is_refused(tmp_path):
    text = (REPO / "pipelines" / "ct_lung" / "pipeline.yaml").read_text()
    (tmp_path / "pipeline.yaml").write_text(text.replace("  min_slices: 20\n",
                                                         "  min_slices: 20\n  contrast: [arterial]\n"))
    with pytest.raises(ManifestError, match="accepts.contrast"):
        load_manifest(tmp_path)
    (tmp_path / "pipeline.yaml").write_text(text.replace("  min_slices: 20\n",
                                                         "  min_slices: 20\n  contrast: [non-contrast, contrast]\n"))
    assert load_manifest(tmp_path).accepts.contrast == ["non-contrast", "contrast"]


# -- the refusal and its reasons ---------------------------------------------------------------------------


def test_input_rejected_keeps_every_reason_through_a_worker_process_boundary(tmp_path):
    manifest = load_manifest(REPO / "pipelines" / "ct_lung")
    volume = load_volume(small_series(tmp_path, "qc-pickle", slices=8, ContrastBolusAgent="X"))
    with pytest.raises(InputRejected) as raised:
        check_input(volume, manifest)
    copy = pickle.loads(pickle.dumps(raised.value))
    assert copy.reasons == raised.value.reasons == ("8 slices, fewer than the 20 required",)
    assert str(copy) == str(raised.value) == (
        f"input outside the validated range of ct_lung {manifest.version}: 8 slices, fewer than the 20 required")


# -- configuration -----------------------------------------------------------------------------------------


def test_no_result_sr_is_on_by_default_and_a_rule_can_override_it():
    assert NodeConfig().qc.no_result_sr is True
    config = parse_config("""
qc: {no_result_sr: false}
peers:
  - {ae_title: PACS, host: 127.0.0.1, port: 104, accepts: [sr, no_result_sr]}
rules:
  - {name: quiet, match: {Modality: CT}, pipelines: [ct_lung]}
  - {name: tell, match: {Modality: MR}, pipelines: [ct_lung], no_result_sr: true}
""")
    assert (config.no_result_sr("quiet"), config.no_result_sr("tell"), config.no_result_sr("gone")) == (
        False, True, False)
    assert NodeConfig().no_result_sr("chest-ct-lungs") is True


def test_qc_errors_name_the_key_and_line():
    with pytest.raises(ConfigError) as raised:
        parse_config("node: {ae_title: AI}\nqc:\n  no_result_sr: perhaps\n", "node.yaml")
    assert "node.yaml:3: qc.no_result_sr" in str(raised.value)
    with pytest.raises(ConfigError) as raised:
        parse_config("qc: {send_sr: true}\n", "node.yaml")
    assert "node.yaml:1: qc.send_sr" in str(raised.value)


def test_the_example_configuration_is_valid():
    from dicom_ai_node.config import load_config

    config = load_config(REPO / "deploy" / "node.yaml")
    assert config.qc.no_result_sr is True


# -- a refused job -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runner(tmp_path_factory) -> JobRunner:
    config = node_config(tmp_path_factory.mktemp("node"), free_port())
    return JobRunner(config, discover([REPO / "pipelines"]), "cpu")


def test_a_refused_job_fails_with_every_reason_unless_it_asks_for_a_no_result_sr(runner, tmp_path):
    paths = tuple(str(p) for p in small_series(tmp_path, "qc-job", slices=8))
    with pytest.raises(InputRejected, match="8 slices, fewer than the 20 required"):
        runner.run(JobSpec(1, "ct_lung", paths))  # the default of a bare JobSpec: no SR
    assert not runner.config.job_results_dir(1).exists()
    assert "ct_lung" not in runner._warm  # the pipeline was not even loaded for a refused series


def test_a_refused_job_answers_with_a_validated_no_result_sr(runner, tmp_path):
    require_tool("dciodvfy")
    paths = tuple(str(p) for p in small_series(tmp_path, "qc-sr", slices=8))
    profiles = (OutputProfile(), OutputProfile("binary", "viewer"))
    outcome = runner.run(JobSpec(2, "ct_lung", paths, profiles, series_revision=2, no_result_sr=True))
    [result] = outcome.files
    assert (result.kind, result.modality, result.profiles) == ("no_result_sr", "SR", frozenset(profiles))
    assert result.path.parent == runner.config.job_results_dir(2) and result.path.exists()
    assert outcome.refusal.startswith("InputRejected: input outside the validated range of ct_lung")
    assert outcome.reasons == ("8 slices, fewer than the 20 required",)
    assert set(outcome.stages) == {"load", "no-result-sr"}
    sr = pydicom.dcmread(result.path)
    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    manifest = runner.manifests["ct_lung"]
    assert check_result(sr, sources, manifest=manifest) == []
    assert no_result_reasons(sr) == ["8 slices, fewer than the 20 required"]
    assert sr.InstanceNumber == 2
    again = runner.run(JobSpec(3, "ct_lung", paths, profiles, series_revision=2, no_result_sr=True))
    assert again.files[0].sop_uid == result.sop_uid  # a retry of the same revision: the same object


def test_a_series_that_is_not_a_volume_answers_with_the_volume_error(runner, tmp_path):
    paths = [str(p) for p in small_series(tmp_path, "qc-gap", slices=24)]
    del paths[10]  # a missing slice: unevenly spaced
    with pytest.raises(VolumeError, match="uneven slice spacing"):
        runner.run(JobSpec(4, "ct_lung", tuple(paths)))
    outcome = runner.run(JobSpec(5, "ct_lung", tuple(paths), no_result_sr=True))
    assert outcome.refusal.startswith("VolumeError: series ")
    [reason] = no_result_reasons(pydicom.dcmread(outcome.files[0].path))
    assert "uneven slice spacing" in reason and reason == outcome.reasons[0]


def test_other_errors_still_fail_the_job(runner, tmp_path):
    paths = small_series(tmp_path, "qc-not-hu", slices=24)
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.RescaleType = "US"  # inside the validated range, but the pipeline itself refuses it: not a QC refusal
        ds.save_as(path)
    with pytest.raises(ValueError, match="Hounsfield") as raised:
        runner.run(JobSpec(6, "ct_lung", tuple(str(p) for p in paths), no_result_sr=True))
    assert not isinstance(raised.value, (InputRejected, VolumeError))


class NoActors:
    def borrow(self):
        raise AssertionError("a refused series must never reach a pipeline actor")


def test_the_ray_executor_answers_a_refusal_as_the_local_one_does(runner, tmp_path):
    pytest.importorskip("ray")
    from dicom_ai_node.jobs.ray_executor import RayExecutor

    executor = object.__new__(RayExecutor)  # no cluster needed: QC runs on the node, before any actor
    executor.config, executor.manifests = runner.config, runner.manifests
    executor._pools = {name: NoActors() for name in runner.manifests}
    paths = tuple(str(p) for p in small_series(tmp_path, "qc-ray", slices=8))
    with pytest.raises(InputRejected, match="8 slices, fewer than the 20 required"):
        executor._run(JobSpec(7, "ct_lung", paths))
    remote = executor._run(JobSpec(8, "ct_lung", paths, no_result_sr=True))
    local = runner.run(JobSpec(9, "ct_lung", paths, no_result_sr=True))
    assert (remote.refusal, remote.reasons) == (local.refusal, local.reasons)
    assert [(f.sop_uid, f.kind) for f in remote.files] == [(f.sop_uid, f.kind) for f in local.files]
