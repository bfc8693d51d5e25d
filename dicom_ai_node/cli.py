"""`dicom-ai-node serve|check-config|test-rule|status|replay|batch|demo|pipelines`."""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

from dicom_ai_node import __version__
from dicom_ai_node.config import ConfigError, NodeConfig, load_config, with_overrides
from dicom_ai_node.pipeline import ManifestError

log = logging.getLogger("dicom_ai_node")
SWITCH_INTERVAL_S = 0.0005


def setup_logging(level: int) -> None:
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # pynetdicom's INFO lines are per-message chatter; its warnings and errors still show.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("highdicom").setLevel(logging.WARNING)  # it logs every module it copies


def _config(args: argparse.Namespace) -> NodeConfig:
    config = load_config(Path(args.config) if args.config else None)
    return with_overrides(
        config,
        port=getattr(args, "port", None),
        ae_title=getattr(args, "ae_title", None),
        data_dir=getattr(args, "data_dir", None),
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from dicom_ai_node.service import NodeService

    config = _config(args)
    # The association threads block in I/O most of the time; every time one comes back it waits for the
    # GIL, which a busy thread (the placer, the assembler) keeps for the whole switch interval, 5 ms by
    # default: at 0.5 ms an acknowledgement is no longer held up behind their Python work.
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    service = NodeService(config)

    def stop_on_signal(signum: int, _frame: object) -> None:
        # systemd and docker stop with SIGTERM: stop as on Ctrl-C (journal placed, associations closed).
        log.info("%s: stopping", signal.Signals(signum).name)
        service.request_stop()

    signal.signal(signal.SIGTERM, stop_on_signal)
    log.info("dicom-ai-node %s: data in %s, pipelines: %s", __version__, config.node.data_dir.resolve(),
             ", ".join(f"{m.name} {m.version}" for m in service.manifests.values()) or "none")
    service.serve_forever()
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    from dicom_ai_node.service import load_pipelines

    config = load_config(Path(args.file))
    manifests = load_pipelines(config)
    print(f"{args.file}: OK ({len(config.peers)} peers, {len(config.rules)} rules, "
          f"{len(config.batch)} batch jobs, pipelines: {', '.join(sorted(manifests)) or 'none'})")
    return 0


def cmd_pipelines(args: argparse.Namespace) -> int:
    from dicom_ai_node.service import load_pipelines

    config = _config(args)
    jobs: dict[str, Counter] = defaultdict(Counter)
    if config.db_path.exists():
        from dicom_ai_node.jobs.store import JobStore

        for job in JobStore(config.db_path).jobs(limit=100000):
            jobs[job.pipeline][job.state] += 1
    for manifest in load_pipelines(config).values():
        flag = " [not for diagnostic use]" if manifest.model_card.not_for_diagnostic_use else ""
        accepts = " ".join(filter(None, [", ".join(manifest.accepts.modality), ", ".join(manifest.accepts.body_part)]))
        print(f"{manifest.name} {manifest.version}: {manifest.title}{flag}\n  accepts {accepts}; "
              f"outputs {', '.join(manifest.outputs)}; {manifest.folder}")
        if manifest.model is not None:
            model = manifest.model
            print(f"  model: {model.format} {model.path} (AMP on GPU {'on' if model.amp else 'off'}, "
                  f"torch.compile {'on' if model.compile else 'off'}); needs {manifest.gpu_memory_mb} MB GPU memory")
        rules = [r.name for r in config.rules if manifest.name in r.pipelines]
        state = f"enabled by rule(s) {', '.join(rules)}" if rules else "not used by any rule"
        counts = ", ".join(f"{n} {job_state}" for job_state, n in sorted(jobs[manifest.name].items()))
        print(f"  state: {state}; jobs: {counts or 'none yet'}")
    return 0


def cmd_test_rule(args: argparse.Namespace) -> int:
    import pydicom

    from dicom_ai_node.route import assignments, route
    from dicom_ai_node.spool import InvalidInstance, parse_instance

    config = _config(args)
    headers: dict[str, dict] = {}
    paths_of: dict[str, list[Path]] = defaultdict(list)
    files = [p for p in sorted(Path(args.folder).rglob("*")) if p.is_file()]
    for path in files:
        raw = path.read_bytes()
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            header = parse_instance(raw, str(ds.SOPClassUID), str(ds.SOPInstanceUID))
        except (InvalidInstance, Exception) as exc:  # noqa: BLE001 - report and go on with the others
            print(f"{path}: skipped ({exc})")
            continue
        headers.setdefault(header.series_uid, header.routing_header)
        paths_of[header.series_uid].append(path)
    if not headers:
        print(f"{args.folder}: no readable DICOM instance")
        return 1
    for series_uid, header in headers.items():
        print(f"series {series_uid} ({len(paths_of[series_uid])} instances, Modality {header.get('Modality', '?')}, "
              f"calling AE {args.calling_ae!r})")
        if config.uses_content_labels:
            from dicom_ai_node.service import content_header

            content = content_header(paths_of[series_uid])
            print(f"  content labels from the pixels: {content}")
            header = {**header, **content}
        decisions = route(config.rules, header, args.calling_ae)
        for decision in decisions:
            print("  " + decision.explain().replace("\n", "\n  "))
        chosen = assignments(decisions)
        print("  => " + (", ".join(a.pipeline for a in chosen) if chosen else "no pipeline runs"))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from dicom_ai_node.assemble import SeriesWaiting, series_completion
    from dicom_ai_node.jobs.store import JobStore
    from dicom_ai_node.assemble import StudyWaiting
    from dicom_ai_node.service import completion_policy, series_progress, study_outcomes, study_rules

    config = _config(args)
    if not config.db_path.exists():
        print(f"no state database at {config.db_path}: nothing received yet")
        return 0
    store = JobStore(config.db_path)
    now = time.time()
    policy = completion_policy(config)
    studies = study_rules(config)
    print("SERIES")
    for s in store.all_series():
        line = f"  {s.series_uid}  {s.state:<9} {s.instances:>5} inst  from {s.calling_ae}"
        if s.state == "receiving":
            decision = series_completion(series_progress(s, [i.header for i in store.instances(s.series_uid)], config), now, policy)
            if isinstance(decision, SeriesWaiting):
                line += f"  waiting {decision.remaining_s:.0f} s more: {decision.reason}"
            else:
                waits = [o for o in study_outcomes(config, store, studies, s, now).values()
                         if isinstance(o, StudyWaiting)]
                line += f"  complete; {waits[0].reason}" if waits else f"  complete, routing now: {decision.reason}"
        elif s.note:
            line += f"  {s.note}"
        print(line)
    print("JOBS")
    for j in store.jobs():
        sends = store.sends(j.id)
        sent = sum(x.state == "sent" for x in sends)
        progress = f" sent {sent}/{len(sends)}" if sends else ""
        label = "waiting" if j.state == "queued" else "error"  # a queued job's reason: the memory guard
        error = f"  {label}: {j.last_error}" if j.last_error else ""
        print(f"  #{j.id:<5} {j.state:<11} {j.pipeline:<14} series {j.series_uid} attempts {j.attempts}{progress}{error}")
    dead = [s for s in store.sends() if s.state == "dead"]
    print(f"DEAD-LETTER ({len(dead)}; `dicom-ai-node replay` sends them again)")
    for s in dead:
        print(f"  job #{s.job_id:<5} -> {s.destination:<16} {s.sop_uid} attempts {s.attempts}  error: {s.last_error}")
    print("DESTINATIONS")
    for d in store.destinations():
        state = f"paused for {d.open_until - now:.0f} s" if d.open_until > now else "open for sends"
        print(f"  {d.name:<16} {state}; {d.consecutive_failures} consecutive failures; last error: {d.last_error}")
    print("BATCH RUNS (`dicom-ai-node batch list` for the jobs and their schedules)")
    for line in batch_run_lines(store, limit=10):
        print(line)
    print("INGEST JOURNALS (acknowledged instances on their way to the spool)")
    for journal in store.journals():
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(journal.updated))
        if journal.last_error:
            print(f"  {journal.name:<4} {journal.waiting} instance(s) not yet in the spool as of {since}, kept in the "
                  f"journal and retried; last error: {journal.last_error}")
        else:
            print(f"  {journal.name:<4} placed up to record {journal.checkpoint_seq} at {since}")
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from dicom_ai_node.audit import AuditLog
    from dicom_ai_node.jobs.store import JobStore

    if not (args.study or args.destination or args.all):
        print("replay: say what to send again: --study UID, --destination AE, or --all", file=sys.stderr)
        return 2
    config = _config(args)
    store = JobStore(config.db_path)
    count = store.replay(study_uid=args.study, destination=args.destination)
    AuditLog(config.audit_path).write("replay", study_uid=args.study, destination=args.destination, sends=count)
    print(f"queued {count} dead-lettered send(s) again; the running node delivers them")
    return 0


def processing(store, study_uid: str) -> str:
    """What became of a pulled study in the node: its series' states and their jobs', e.g. "; in the node:
    1 series routed, jobs 1 done"."""
    series = store.series_of_study(study_uid)
    if not series:
        return ""
    states = Counter(s.state for s in series)
    jobs = Counter(j.state for s in series for j in store.jobs(s.series_uid))
    text = ", ".join(f"{n} series {state}" for state, n in sorted(states.items()))
    if jobs:
        text += "; jobs " + ", ".join(f"{n} {state}" for state, n in sorted(jobs.items()))
    return f"; in the node: {text}"


def batch_run_lines(store, limit: int, job: str | None = None) -> list[str]:
    """The latest batch runs (of `job`), each with its studies' progress."""
    lines = []
    for run in store.batch_runs(limit=limit, job=job):
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(run.started))
        lines.append(f"  run #{run.id:<4} {run.job:<20} {run.state:<8} from {run.source} ({run.trigger}) started "
                     f"{started}: {run.note or f'{run.found} studies found'}")
        for study in store.batch_studies(run.id):
            series = f"series {study.series_done}/{study.series_total}" if study.series_total else "series ?"
            pulling = f", {study.remaining} remaining" if study.state == "pulling" and study.remaining else ""
            label = "note" if study.state in ("waiting", "skipped") else "error"
            error = f"  {label}: {study.last_error}" if study.last_error else ""
            lines.append(f"    study {study.study_uid}  {study.state:<8} {series}, {study.completed} instances "
                         f"delivered, {study.failed} failed{pulling}{processing(store, study.study_uid)}{error}")
    return lines or ["  none yet"]


def next_cron_run(cron: str) -> str:
    """When a cron line fires next, in local time."""
    from datetime import datetime

    from apscheduler.triggers.cron import CronTrigger

    trigger = CronTrigger.from_crontab(cron)
    when = trigger.get_next_fire_time(None, datetime.now(trigger.timezone))
    return when.strftime("%Y-%m-%d %H:%M %Z") if when else "never"


def cmd_batch_list(args: argparse.Namespace) -> int:
    from dicom_ai_node.jobs.store import JobStore

    config = _config(args)
    if not config.batch:
        print("no batch jobs configured (node.yaml: batch)")
        return 0
    store = JobStore(config.db_path)
    for job in config.batch:
        schedule = f"cron {job.cron!r} (next {next_cron_run(job.cron)})" if job.cron else (
            f"every {job.every_minutes:g} min while the node runs" if job.every_minutes else "on command only")
        keys = ", ".join(f"{k}={v!r}" for k, v in {**job.query, **job.series}.items())
        days = f"; StudyDate in the last {job.study_days} day(s)" if job.study_days else ""
        studies = f"matching {keys or 'every study'}{days}"
        if job.worklist is not None:
            steps = ", ".join(f"{k}={v!r}" for k, v in job.worklist.query.items()) or "any step"
            days = f", starting in the last {job.study_days} day(s)" if job.study_days else ""
            series = ", ".join(f"{k}={v!r}" for k, v in job.series.items())
            studies = (f"studies scheduled in {job.worklist.source}'s worklist ({steps}{days})"
                       + (f", series matching {series}" if series else ""))
        print(f"{job.name}: from {job.source}, {schedule}; {studies}; at most {job.max_studies} studies a run")
        for line in batch_run_lines(store, limit=3, job=job.name):
            print(line)
    return 0


def cmd_batch_run(args: argparse.Namespace) -> int:
    from dicom_ai_node.audit import AuditLog
    from dicom_ai_node.jobs.store import JobStore
    from dicom_ai_node.worklist.batch import BatchError, BatchRunner
    from dicom_ai_node.worklist.qr import QueryRetrieveError

    config = _config(args)
    runner = BatchRunner(config, JobStore(config.db_path), AuditLog(config.audit_path))
    try:
        if args.dry_run:
            found, studies = runner.preview(args.name, again=args.again)
            print(f"dry run, nothing pulled: {found}; a run would pull "
                  f"{sum(not before for _, _, before in studies)}")
            for uid, summary, before in studies:
                print(f"  {uid}  {'pulled before, left' if before else 'would pull'}  ({summary})")
            return 0
        run = runner.run(args.name, trigger="command", again=args.again, report=print)
    except BatchError as exc:
        print(f"batch: {exc}", file=sys.stderr)
        return 2
    except QueryRetrieveError as exc:  # a dry run's query
        print(f"batch: {exc}", file=sys.stderr)
        return 1
    return 0 if run.state == "done" else 1


def cmd_demo(args: argparse.Namespace) -> int:
    from dicom_ai_node.demo import run_demo

    return run_demo(_config(args), host=args.host, wait_s=args.timeout)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dicom-ai-node", description=__doc__)
    parser.add_argument("--version", action="version", version=__version__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser, overrides: bool = True) -> argparse.ArgumentParser:
        p.add_argument("--config", help="node.yaml (default: embedded defaults)")
        if overrides:
            p.add_argument("--port", type=int)
            p.add_argument("--ae-title")
            p.add_argument("--data-dir", type=Path)
        return p

    with_config(sub.add_parser("serve", help="run the node")).set_defaults(func=cmd_serve)
    p = sub.add_parser("check-config", help="validate a node.yaml and its pipelines")
    p.add_argument("file")
    p.set_defaults(func=cmd_check_config)
    with_config(sub.add_parser("pipelines", help="list the pipelines found")).set_defaults(func=cmd_pipelines)
    p = with_config(sub.add_parser("test-rule", help="show which rules fire for a folder of DICOM files, and why"))
    p.add_argument("folder")
    p.add_argument("--calling-ae", default="ANY", help="calling AE title to assume (default ANY)")
    p.set_defaults(func=cmd_test_rule)
    with_config(sub.add_parser("status", help="series, jobs and sends, and why series wait")).set_defaults(
        func=cmd_status)
    p = with_config(sub.add_parser("replay", help="send dead-lettered results again"))
    p.add_argument("--study", help="only this StudyInstanceUID")
    p.add_argument("--destination", help="only this destination AE title (or outbox)")
    p.add_argument("--all", action="store_true", help="every dead-lettered send")
    p.set_defaults(func=cmd_replay)
    batch = sub.add_parser("batch", help="pull studies from a PACS: the batch jobs of node.yaml").add_subparsers(
        dest="batch_command", required=True)
    with_config(batch.add_parser("list", help="batch jobs, their schedules and latest runs")).set_defaults(
        func=cmd_batch_list)
    p = with_config(batch.add_parser("run", help="run a batch job now (the node must be running to receive)"))
    p.add_argument("name")
    p.add_argument("--again", action="store_true", help="pull studies pulled before too")
    p.add_argument("--dry-run", action="store_true", help="only say which studies a run would pull")
    p.set_defaults(func=cmd_batch_run)
    p = with_config(sub.add_parser("demo", help="push a synthetic chest CT to a running node and wait for results"))
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for results (0: do not wait)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(logging.DEBUG if args.verbose else logging.INFO)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, ManifestError) as exc:
        print(f"configuration error:\n{exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
