"""node.yaml: the node's whole configuration, validated with pydantic.

Every error names the key path and, when the value came from a file, the file and line, so that an operator
can fix a typo without reading a traceback. With no file the embedded defaults apply: AE title
DICOM_AI_NODE on port 11112, data under ./var, chest CTs routed to the ct_lung pipeline, results back to
the sending peer (or to the outbox folder when no peer is configured).
"""
from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydicom.datadict import tag_for_keyword

PACKAGE_PIPELINES = Path(__file__).resolve().parent.parent / "pipelines"
AE_TITLE_PATTERN = r"^[\x21-\x5b\x5d-\x7e](?:[\x20-\x5b\x5d-\x7e]{0,14}[\x21-\x5b\x5d-\x7e])?$"
OUTBOX = "outbox"  # destination name: write results to <data_dir>/outbox instead of sending them
# Besides DICOM keywords, rules may match the calling AE and the labels the content classifier computes
# from the pixels (dicom_ai_node.imaging.content) when a header's BodyPartExamined is missing or wrong.
CONTENT_MATCH_KEYS = {"ContentBodyRegion", "ContentBodyRegions"}
SPECIAL_MATCH_KEYS = {"calling_ae"} | CONTENT_MATCH_KEYS

DEFAULT_RULES: list[dict[str, Any]] = [
    {
        "name": "chest-ct-lungs",
        "match": {"Modality": "CT", "BodyPartExamined": ["CHEST", "LUNG", "THORAX"], "SliceThickness": "<=5"},
        "pipelines": ["ct_lung"],
    },
    {
        "name": "chest-radiograph-nodule",
        "match": {"Modality": ["DX", "CR"], "BodyPartExamined": "CHEST"},
        "pipelines": ["cr_nodule_classifier"],
    },
]


class ConfigError(ValueError):
    """Invalid configuration; str() lists one problem per line with key path and file line."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NodeSettings(Strict):
    ae_title: str = Field("DICOM_AI_NODE", pattern=AE_TITLE_PATTERN)
    port: int = Field(11112, ge=1, le=65535)
    bind_address: str = "0.0.0.0"
    data_dir: Path = Path("./var")
    # Root of every UID the node makes. The default is pydicom's registered root, which is meant for
    # exactly this use; a hospital with its own root should set it here.
    org_root: str = Field("1.2.826.0.1.3680043.8.498.", pattern=r"^[0-9]+(\.[0-9]+)*\.$", max_length=40)
    institution_name: str | None = None
    accept_any_called_ae: bool = False
    max_associations: int = Field(16, ge=1, le=256)
    # Processes that receive (each with its own GIL and ingest journal); 1 receives in the node's process.
    receive_processes: int = Field(1, ge=1, le=32)
    max_pdu_bytes: int = Field(0, ge=0)  # 0 = unlimited, which lets senders use their largest PDUs
    max_instance_mb: int = Field(2048, ge=1)
    min_free_disk_mb: int = Field(1024, ge=0)  # below this, C-STORE answers 0xA700 Out of Resources
    network_timeout_s: float = Field(60.0, gt=0)

    @field_validator("bind_address")
    @classmethod
    def _ip(cls, value: str) -> str:
        ipaddress.ip_address(value)
        return value


class Peer(Strict):
    """A DICOM application that may associate with the node and/or receive its results."""

    ae_title: str = Field(pattern=AE_TITLE_PATTERN)
    host: str
    port: int = Field(ge=1, le=65535)
    # Bind the AE title to `host`: an association from another IP with this calling AE is rejected.
    check_ip: bool = True
    # What this destination receives of each job's results (None: every kind the pipeline writes). Some
    # PACS refuse SEG or Parametric Map; viewers such as OHIF 3.13 show only BINARY SEG and an SR whose
    # every measurement group has image coordinates (sr_profile: viewer).
    accepts: list[Literal["seg", "sr", "sc", "pmap", "heatmap_sc", "gsps", "no_result_sr"]] | None = None
    seg_type: Literal["binary", "fractional", "labelmap"] | None = None  # None: as the pipeline's masks are
    sr_profile: Literal["full", "viewer"] = "full"


def _check_conditions(match: dict[str, Any], special: set[str]) -> dict[str, Any]:
    from dicom_ai_node.route import parse_condition  # the grammar lives with the matcher

    for key, value in match.items():
        if key not in special and tag_for_keyword(key) is None:
            raise ValueError(f"match key {key!r} is not a DICOM keyword (nor one of {sorted(special)})")
        parse_condition(key, value)
    return match


class StudyRequirementModel(Strict):
    name: str = Field(min_length=1, max_length=64)
    match: dict[str, Any] = Field(default_factory=dict)

    @field_validator("match")
    @classmethod
    def _known_keywords(cls, match: dict[str, Any]) -> dict[str, Any]:
        return _check_conditions(match, set())


class StudyRuleModel(Strict):
    """A study-level wait: rules that name it run only once every required series is complete."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    requires: list[StudyRequirementModel] = Field(min_length=1)
    timeout_s: float = Field(900.0, gt=0)  # from the study's first instance
    on_timeout: Literal["run", "fail"] = "run"  # run with the complete series, or give up with a note


class Completion(Strict):
    quiet_period_s: float = Field(60.0, gt=0)
    modality_quiet_period_s: dict[str, float] = Field(default_factory=dict)  # e.g. {CT: 30, MR: 90}
    after_release_s: float | None = Field(5.0, ge=0)  # wait after the sender released; null: no shortening
    settle_s: float = Field(1.0, ge=0)  # wait once the expected instance count has arrived
    max_wait_s: float = Field(3600.0, gt=0)  # a series still receiving this long is completed regardless
    studies: list[StudyRuleModel] = Field(default_factory=list)

    @field_validator("modality_quiet_period_s")
    @classmethod
    def _positive(cls, value: dict[str, float]) -> dict[str, float]:
        for modality, seconds in value.items():
            if seconds <= 0:
                raise ValueError(f"{modality}: quiet period must be > 0 s")
        return value


class Rule(Strict):
    """When a complete series matches, process it with pipelines and/or forward its instances."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    match: dict[str, Any] = Field(default_factory=dict)
    action: Literal["process", "forward", "both"] = "process"
    pipelines: list[str] = Field(default_factory=list)
    destinations: list[str] | None = None  # results; None: back to the sending peer, else the outbox
    forward_to: list[str] = Field(default_factory=list)  # where received instances are forwarded
    forward_filter: dict[str, Any] = Field(default_factory=dict)  # per-instance conditions, e.g. SOPClassUID
    quiet_period_s: float | None = Field(None, gt=0)  # overrides the completion quiet period for its series
    study: str | None = None  # name of a completion.studies entry to wait for before this rule runs
    priority: int = 0
    no_result_sr: bool | None = None  # overrides qc.no_result_sr for the jobs of this rule

    @field_validator("match")
    @classmethod
    def _known_keywords(cls, match: dict[str, Any]) -> dict[str, Any]:
        return _check_conditions(match, SPECIAL_MATCH_KEYS)

    @field_validator("forward_filter")
    @classmethod
    def _known_filter_keywords(cls, match: dict[str, Any]) -> dict[str, Any]:
        return _check_conditions(match, set())

    @model_validator(mode="after")
    def _action_has_targets(self) -> "Rule":
        if self.action in ("process", "both") and not self.pipelines:
            raise ValueError(f"action {self.action!r} needs at least one pipeline in 'pipelines'")
        if self.action in ("forward", "both") and not self.forward_to:
            raise ValueError(f"action {self.action!r} needs at least one destination in 'forward_to'")
        return self

    @property
    def processes(self) -> bool:
        return self.action in ("process", "both")

    @property
    def forwards(self) -> bool:
        return self.action in ("forward", "both")


class Dispatch(Strict):
    """Retries per destination: exponential backoff up to a cap; dead-letter after max_age_s."""

    initial_delay_s: float = Field(5.0, ge=0)
    backoff_factor: float = Field(2.0, ge=1)
    max_delay_s: float = Field(300.0, ge=0)
    max_age_s: float = Field(86400.0, gt=0)  # a send still failing this long after it was queued is dead
    max_attempts: int | None = Field(None, ge=1)  # optional cap on attempts as well
    timeout_s: float = Field(30.0, gt=0)
    # Circuit breaker: after this many consecutive failed associations a destination is left alone for
    # breaker_open_s (then one association is tried again), so a PACS that is down is not hammered.
    breaker_failures: int = Field(3, ge=1)
    breaker_open_s: float = Field(60.0, ge=0)


class Retention(Strict):
    """Spool data of series whose jobs are all finished is removed after spool_days (0: keep forever)."""

    spool_days: float = Field(7.0, ge=0)
    results_days: float = Field(30.0, ge=0)


class QC(Strict):
    """What happens when input QC refuses a series (outside a pipeline's validated range, or not a consistent
    volume): the job always records every reason; with no_result_sr the node also sends the job's
    destinations an SR stating that no result was produced and why, instead of failing the job in silence."""

    no_result_sr: bool = True


class Workers(Strict):
    executor: Literal["local", "ray"] = "local"
    count: int = Field(1, ge=1, le=64)  # CPU worker processes (with GPUs: one worker per GPU)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    ray_address: str = "auto"  # executor ray: address of an existing Ray cluster


# Modalities of objects made from images (the node's own results among them): a batch pull leaves their
# series in the PACS unless the job's `series` keys ask for a Modality explicitly.
DERIVED_MODALITIES = ("SEG", "SR", "PR", "KO", "REG", "RWV")


def _check_query_keys(keys: dict[str, Any], level: str) -> dict[str, str]:
    checked = {}
    for key, value in keys.items():
        if tag_for_keyword(key) is None:
            raise ValueError(f"{level} key {key!r} is not a DICOM keyword")
        if key in ("QueryRetrieveLevel", "StudyInstanceUID", "SeriesInstanceUID"):
            raise ValueError(f"{level} key {key!r} is set by the node, not by the job")
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ValueError(f"{level} key {key!r}: give one matching value as a string (wildcards * and ?, "
                             f"ranges as A-B), not a {type(value).__name__}")
        checked[key] = str(value)
    return checked


class WorklistSource(Strict):
    """Where a batch job's studies come from when they are scheduled, not yet searched for: a Modality
    Worklist (C-FIND). Keys of a Scheduled Procedure Step (Modality, ScheduledStationAETitle, ...) match in
    its sequence item, the others at the top level."""

    source: str = Field(pattern=AE_TITLE_PATTERN)  # a configured peer answering Modality Worklist C-FIND
    query: dict[str, Any] = Field(default_factory=dict)

    @field_validator("query")
    @classmethod
    def _keys(cls, keys: dict[str, Any]) -> dict[str, str]:
        return _check_query_keys(keys, "worklist query")


class BatchJob(Strict):
    """A pull from a PACS: C-FIND the studies matching `query` at `source`, C-MOVE (or C-GET) their series to
    the node (which receives and processes them like pushed ones), on a schedule and/or with `dicom-ai-node
    batch run`. A study pulled in full from a source is not pulled from it again."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    source: str = Field(pattern=AE_TITLE_PATTERN)  # a configured peer answering C-FIND and C-MOVE
    query: dict[str, Any] = Field(default_factory=dict)  # STUDY level matching keys, e.g. ModalitiesInStudy: CT
    series: dict[str, Any] = Field(default_factory=dict)  # SERIES level matching keys, e.g. Modality: CT
    study_days: int | None = Field(None, ge=1)  # StudyDate in the last N days, today included (1: today)
    # The studies are those scheduled in a worklist (study_days: by procedure step start date), each pulled
    # from `source` once it is there; `query` is then not used.
    worklist: WorklistSource | None = None
    # move: the PACS sends the series to the node's AE title (it must know the node's host and port); get: it
    # sends them back on the node's own association (it need not know the node; it must allow C-GET).
    retrieve: Literal["move", "get"] = "move"
    cron: str | None = None  # crontab line in the node's local time, e.g. "0 2 * * *"
    every_minutes: float | None = Field(None, gt=0)
    max_studies: int = Field(100, ge=1)  # per run; the rest are pulled by the next run

    @field_validator("query")
    @classmethod
    def _study_keys(cls, keys: dict[str, Any]) -> dict[str, str]:
        return _check_query_keys(keys, "query")

    @field_validator("series")
    @classmethod
    def _series_keys(cls, keys: dict[str, Any]) -> dict[str, str]:
        return _check_query_keys(keys, "series")

    @field_validator("cron")
    @classmethod
    def _crontab(cls, value: str | None) -> str | None:
        if value is not None:
            from apscheduler.triggers.cron import CronTrigger

            try:
                CronTrigger.from_crontab(value)
            except ValueError as exc:
                raise ValueError(f"cron {value!r} is not a crontab line (minute hour day month weekday): {exc}")
        return value

    @model_validator(mode="after")
    def _one_schedule_one_date(self) -> "BatchJob":
        if self.cron is not None and self.every_minutes is not None:
            raise ValueError("give cron or every_minutes, not both")
        if self.study_days is not None and "StudyDate" in self.query:
            raise ValueError("give study_days or a StudyDate query key, not both")
        if self.worklist is not None and self.query:
            raise ValueError("a worklist job takes its studies from the worklist: give its keys in worklist.query")
        if self.worklist is not None and self.study_days is not None and (
                "ScheduledProcedureStepStartDate" in self.worklist.query):
            raise ValueError("give study_days or a ScheduledProcedureStepStartDate worklist key, not both")
        return self


class NodeConfig(Strict):
    node: NodeSettings = Field(default_factory=NodeSettings)
    peers: list[Peer] = Field(default_factory=list)
    completion: Completion = Field(default_factory=Completion)
    pipeline_folders: list[Path] = Field(default_factory=lambda: [PACKAGE_PIPELINES])
    rules: list[Rule] = Field(default_factory=lambda: [Rule.model_validate(r) for r in DEFAULT_RULES])
    dispatch: Dispatch = Field(default_factory=Dispatch)
    workers: Workers = Field(default_factory=Workers)
    retention: Retention = Field(default_factory=Retention)
    qc: QC = Field(default_factory=QC)
    batch: list[BatchJob] = Field(default_factory=list)

    @model_validator(mode="after")
    def _destinations_are_peers(self) -> "NodeConfig":
        names = {p.ae_title for p in self.peers}
        if len(names) != len(self.peers):
            raise ValueError("peers: two peers share one ae_title")
        studies = {study.name for study in self.completion.studies}
        for i, rule in enumerate(self.rules):
            if rule.study is not None and rule.study not in studies:
                raise ValueError(f"rules[{i}] ({rule.name}): study {rule.study!r} is not in completion.studies")
            for dest in (rule.destinations or []) + rule.forward_to:
                if dest != OUTBOX and dest not in names:
                    raise ValueError(
                        f"rules[{i}] ({rule.name}): destination {dest!r} is not a configured peer ae_title "
                        f"nor {OUTBOX!r}"
                    )
        if len({job.name for job in self.batch}) != len(self.batch):
            raise ValueError("batch: two jobs share one name")
        for i, job in enumerate(self.batch):
            if job.source not in names:
                raise ValueError(f"batch[{i}] ({job.name}): source {job.source!r} is not a configured peer ae_title "
                                 "(the node accepts the moved instances only from a peer)")
            if job.worklist is not None and job.worklist.source not in names:
                raise ValueError(f"batch[{i}] ({job.name}): worklist source {job.worklist.source!r} is not a "
                                 "configured peer ae_title")
        return self

    def batch_job(self, name: str) -> BatchJob | None:
        return next((job for job in self.batch if job.name == name), None)

    @property
    def uses_content_labels(self) -> bool:
        """Whether any rule matches on content labels (computing them means loading the series' pixels)."""
        return any(key in CONTENT_MATCH_KEYS for rule in self.rules for key in rule.match)

    def no_result_sr(self, rule_name: str) -> bool:
        """Whether a job of rule `rule_name` answers an input QC refusal with a no-result SR."""
        rule = next((r for r in self.rules if r.name == rule_name), None)
        if rule is not None and rule.no_result_sr is not None:
            return rule.no_result_sr
        return self.qc.no_result_sr

    def peer(self, ae_title: str) -> Peer | None:
        return next((p for p in self.peers if p.ae_title == ae_title), None)

    @property
    def spool_dir(self) -> Path:
        return self.node.data_dir / "spool"

    @property
    def results_dir(self) -> Path:
        return self.node.data_dir / "results"

    def job_results_dir(self, job_id: int) -> Path:
        return self.results_dir / f"job-{job_id:08d}"

    @property
    def outbox_dir(self) -> Path:
        return self.node.data_dir / "outbox"

    @property
    def journal_dir(self) -> Path:
        return self.node.data_dir / "journal"

    @property
    def quarantine_dir(self) -> Path:
        return self.node.data_dir / "quarantine"

    @property
    def db_path(self) -> Path:
        return self.node.data_dir / "state.sqlite3"

    @property
    def audit_path(self) -> Path:
        return self.node.data_dir / "audit.jsonl"


def _line_index(text: str) -> dict[tuple[Any, ...], int]:
    """Map every key path in a YAML document to its 1-based line, for error messages."""
    lines: dict[tuple[Any, ...], int] = {}

    def walk(node: yaml.Node, path: tuple[Any, ...]) -> None:
        lines[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                child = path + (key.value,)
                lines[child] = key.start_mark.line + 1
                walk(value, child)
                lines[child] = key.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, path + (i,))

    root = yaml.compose(text)
    if root is not None:
        walk(root, ())
    return lines


def _located(loc: tuple[Any, ...], lines: dict[tuple[Any, ...], int]) -> int | None:
    for end in range(len(loc), -1, -1):
        if loc[:end] in lines:
            return lines[loc[:end]]
    return None


class _UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader that refuses a key given twice in one mapping (YAML would silently keep the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice (first on line {seen[key]})", key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def parse_config(text: str, source: str = "<string>") -> NodeConfig:
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        raise ConfigError(f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}:1: the top level must be a mapping of sections (node, peers, rules, ...)")
    try:
        return NodeConfig.model_validate(raw)
    except ValidationError as exc:
        lines = _line_index(text)
        problems = []
        for error in exc.errors():
            loc = tuple(error["loc"])
            key = ".".join(str(part) for part in loc) or "(top level)"
            line = _located(loc, lines)
            where = f"{source}:{line}" if line else source
            message = error["msg"].removeprefix("Value error, ")
            problems.append(f"{where}: {key}: {message}")
        raise ConfigError("\n".join(problems)) from None


def load_config(path: Path | None) -> NodeConfig:
    if path is None:
        return NodeConfig()
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read configuration: {exc.strerror}") from exc
    return parse_config(text, str(path))


def with_overrides(config: NodeConfig, **overrides: Any) -> NodeConfig:
    """Apply command-line overrides (port, ae_title, data_dir) and validate again."""
    node = config.node.model_dump()
    node.update({k: v for k, v in overrides.items() if v is not None})
    data = config.model_dump()
    data["node"] = node
    try:
        return NodeConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(
            "\n".join(f"command line: {'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        ) from None

