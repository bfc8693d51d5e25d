"""End-to-end benchmark: from the last instance acknowledged to all results stored in the PACS, against
the bare pipeline call on the same volume (issue 7, benchmark 2; target: node <= 1.2 x the bare call).

    .venv/bin/python benchmarks/end_to_end.py                                  # ct_lung and ct_nodule_unet
    .venv/bin/python benchmarks/end_to_end.py --pipeline ct_lung --slices 60 --size 192 --repeats 1

For each pipeline: a real Orthanc (the PACS, as tests/conftest.py starts it) and a node in this process
(NodeService: real SCP, one worker process, dispatcher) that sends results back to Orthanc. A chest-CT
phantom series is pushed straight to the node over one association (dicom_ai_node.demo.push_datasets, as
Orthanc would push it); push_datasets returns when the last C-STORE is acknowledged and the association
released: that is t0. Orthanc is then polled (GET /statistics every 10 ms, from the moment the node's
dispatcher starts sending, so that polling takes no CPU from the pipeline) until it holds every result
object (SEG, SR, key-image SC): t1.

Completion wait. A PACS gives no "end of series" signal, so the node waits before running: it completes a
series at the earliest of its completion deadlines (assemble.py: last instance + quiet period, association
release + after_release_s, expected count + settle). That wait is configuration, not overhead, and is
subtracted exactly: after the run the series row of the node's job store (last_received, released_at,
instance count) is passed through the node's own deadline computation (assemble._deadlines with
service.series_progress and the node's completion policy), giving the deadline D the node applied. Then

    completion wait = D - t0         node = t1 - t0 - completion wait = t1 - D

so the node's time runs from the moment its completion rule let the series go until the last result is in
Orthanc, and includes the assemble loop noticing the deadline, job scheduling, the worker, and the sends.

Reference: the bare pipeline call, pipeline.run(volume, RunContext()) on the Volume already loaded from the
same files (load_series), pipeline loaded on CPU and warmed by one call before timing. The node is warmed
the same way: one series (another study) goes through it untimed first, so its worker holds the pipeline
warm. Then each of --repeats rounds times one bare call and one series (a new study each) through the node,
alternately, so that both see the same load on a shared machine.

Reported: the best (least disturbed) bare call and the best node round, their ratio, and the ratio of the
medians; "fixed s" is the median of the node's time less its own pipeline call (node - infer): what the
node adds to the pipeline, whatever the machine's load does to inference. The breakdown is that of the best
node round, in seconds, and adds up to its node time:
  load      DICOM decode of the instances into a Volume (JobRunner stage "load"); ~0 when a worker decoded
            the series ahead during the completion wait (jobs/prefetch.py) and the job took that Volume
  qc        input QC against the pipeline's validated range, and the memory guard ("qc")
  infer     the pipeline call in the worker ("infer")
  write     building the DICOM objects, encoding them and saving them durably ("write")
  validate  the rest of the validation gate: check_result, dciodvfy, and waiting for the highdicom
            read-back, which runs in the worker's helper process while the next object is built ("validate")
  send      from the dispatcher starting the destination's drain to the last result seen in Orthanc
            (association, 3 C-STOREs; includes <= 10 ms of this script's polling)
  sched     everything else: the assemble loop noticing the deadline and routing (job created), a worker
            thread claiming the job, handing it to the worker process and back, and the dispatcher picking
            the queued sends up
Stage timings come from the job store (jobs.stages); routed = jobs.created, finished = sends.created; the
claim and the drain start are timestamped by wrapping the node's JobStore.claim_job and Dispatcher.drain
in this process (benchmark instrumentation only).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from conftest import free_port, start_orthanc  # noqa: E402  (a real Orthanc on free ports, as the tests start it)
from dicom_ai_node.assemble import _deadlines  # noqa: E402
from dicom_ai_node.config import parse_config  # noqa: E402
from dicom_ai_node.demo import push_datasets  # noqa: E402
from dicom_ai_node.imaging.series import load_series  # noqa: E402
from dicom_ai_node.phantom import make_chest_phantom  # noqa: E402
from dicom_ai_node.pipeline import RunContext, instantiate, load_manifest  # noqa: E402
from dicom_ai_node.service import NodeService, completion_policy, series_progress  # noqa: E402

PIPELINES = ("ct_lung", "ct_nodule_unet")
NODULES = {"ct_lung": 0, "ct_nodule_unet": 3}
STAGES = ("load", "qc", "infer", "write", "validate", "send", "sched")
POLL_S = 0.01
RESULTS_PER_SERIES = 3  # SEG, SR, key-image SC


def phantom(pipeline: str, slices: int, size: int, tag: str):
    return make_chest_phantom(slices=slices, size=size, nodules=NODULES[pipeline], seed=1,
                              uid_seed=f"bench-e2e-{pipeline}-{slices}-{size}-{tag}")


class BareCall:
    """The reference: the pipeline loaded on CPU in this process, called on the Volume loaded from the files
    of one phantom series, warmed by one untimed call."""

    def __init__(self, pipeline: str, slices: int, size: int, work: Path) -> None:
        series = phantom(pipeline, slices, size, "reference")
        self.volume = load_series(series.write(work / "reference"))
        self.pipeline = instantiate(load_manifest(REPO / "pipelines" / pipeline))
        self.pipeline.load("cpu")
        self.pipeline.run(self.volume, RunContext())

    def seconds(self) -> float:
        start = time.perf_counter()
        self.pipeline.run(self.volume, RunContext())
        return time.perf_counter() - start


def node_yaml(data_dir: Path, port: int, orthanc_port: int, pipeline: str, quiet_s: float, release_s: float) -> str:
    return f"""
node: {{ae_title: DICOM_AI_NODE, port: {port}, bind_address: 127.0.0.1, data_dir: {data_dir}, min_free_disk_mb: 1}}
completion: {{quiet_period_s: {quiet_s}, after_release_s: {release_s}}}
dispatch: {{max_attempts: 3, initial_delay_s: 0.5}}
workers: {{count: 1, device: cpu}}
pipeline_folders: [{REPO / "pipelines"}]
peers:
  - {{ae_title: ORTHANC, host: 127.0.0.1, port: {orthanc_port}}}
rules:
  - {{name: bench, match: {{Modality: CT}}, pipelines: [{pipeline}]}}
"""


class Marks:
    """Wall-clock marks of the node's claim and drain, by wrapping two of its methods (instrumentation)."""

    def __init__(self, node: NodeService) -> None:
        self.claims: list[float] = []
        self.drains: list[float] = []
        claim, drain = node.store.claim_job, node.dispatcher.drain

        def claim_job(*args, **kwargs):
            job = claim(*args, **kwargs)
            if job is not None:
                self.claims.append(time.time())
            return job

        def drain_marked(destination):
            self.drains.append(time.time())
            return drain(destination)

        node.store.claim_job = claim_job
        node.dispatcher.drain = drain_marked


def orthanc_count(orthanc) -> int:
    return int(orthanc.get("/statistics")["CountInstances"])


def push_and_wait(node: NodeService, marks: Marks, orthanc, datasets, expected: int,
                  timeout: float = 900.0) -> tuple[float, float]:
    """(t0, t1): the push acknowledged and released, and every result seen in Orthanc. Orthanc is polled
    only once the dispatcher has started sending (before, polling it would take CPU from the pipeline)."""
    drains = len(marks.drains)
    stored = push_datasets(datasets, "127.0.0.1", node.port, node.config.node.ae_title, calling_ae=orthanc.aet)
    t0 = time.time()
    if stored != len(datasets):
        raise RuntimeError(f"the node stored {stored} of {len(datasets)} instances")
    deadline = t0 + timeout
    while len(marks.drains) == drains:
        if time.time() > deadline:
            raise TimeoutError(f"no result sent after {timeout:g} s")
        time.sleep(POLL_S / 2)
    while orthanc_count(orthanc) < expected:
        if time.time() > deadline:
            raise TimeoutError(f"results not in Orthanc after {timeout:g} s")
        time.sleep(POLL_S)
    return t0, time.time()


def node_run(node: NodeService, marks: Marks, orthanc, series, expected: int) -> dict[str, float]:
    """One timed series through the node: node time, completion wait and the stage breakdown."""
    claims_before, drains_before = len(marks.claims), len(marks.drains)
    t0, t1 = push_and_wait(node, marks, orthanc, series.datasets, expected)
    series_uid = str(series.datasets[0].SeriesInstanceUID)
    row = node.store.series(series_uid)
    progress = series_progress(row, [i.header for i in node.store.instances(series_uid)], node.config)
    applied = min(d.at for d in _deadlines(progress, t1, completion_policy(node.config)) if not d.forced)
    [job] = node.store.jobs(series_uid)
    db = sqlite3.connect(f"file:{node.config.db_path}?mode=ro", uri=True)
    try:
        for _ in range(1000):  # Orthanc has them once it acknowledged; the node records the sends just after
            sends = db.execute("SELECT created, updated, state FROM sends WHERE job_id=?", (job.id,)).fetchall()
            if len(sends) == RESULTS_PER_SERIES and all(state == "sent" for _, _, state in sends):
                break
            time.sleep(POLL_S)
        else:
            raise RuntimeError(f"job {job.id}: sends {sends}")
    finally:
        db.close()
    finished = min(created for created, _, _ in sends)
    claimed = marks.claims[claims_before]
    drain = next(t for t in marks.drains[drains_before:] if t >= finished)
    stages = {key: job.stages.get(key, 0.0) for key in ("load", "qc", "infer", "write", "validate")}
    worker = sum(job.stages.values())
    row = {
        "wait": applied - t0,
        "node": t1 - applied,
        **stages,
        "send": t1 - drain,
        "routed": job.created - applied,
        "claimed": claimed - job.created,
        "worker_ipc": finished - claimed - worker,
        "dispatched": drain - finished,
    }
    row["sched"] = row["routed"] + row["claimed"] + row["worker_ipc"] + row["dispatched"]
    return row


def run_pipeline(pipeline: str, slices: int, size: int, repeats: int, quiet_s: float, release_s: float,
                 work: Path, verbose: bool) -> dict[str, float]:
    """Median of `repeats` rounds of one bare call and one series through the node, alternately, so that
    both see the same load on a shared machine."""
    bare = BareCall(pipeline, slices, size, work)
    orthanc = start_orthanc(work / "orthanc", "bench-pacs", StableAge=60)
    node = None
    try:
        port = free_port()
        node = NodeService(parse_config(node_yaml(work / "node", port, orthanc.dicom_port, pipeline, quiet_s,
                                                  release_s), "benchmark node.yaml"))
        node.start()
        marks = Marks(node)
        expected = orthanc_count(orthanc) + RESULTS_PER_SERIES
        push_and_wait(node, marks, orthanc, phantom(pipeline, slices, size, "warm-up").datasets, expected)
        runs = []
        for i in range(repeats):
            series = phantom(pipeline, slices, size, f"run-{i}")
            reference = bare.seconds()
            expected += RESULTS_PER_SERIES
            runs.append({"bare": reference, **node_run(node, marks, orthanc, series, expected)})
            if verbose:
                print(f"  {pipeline} run {i + 1}: " + ", ".join(f"{k} {v:.3f}" for k, v in runs[-1].items()),
                      flush=True)
    finally:
        if node is not None:
            node.stop()
        orthanc.stop()
    best = min(runs, key=lambda r: r["node"])
    return {**best, "bare": min(r["bare"] for r in runs),
            "fixed": statistics.median(r["node"] - r["infer"] for r in runs),
            "median bare": statistics.median(r["bare"] for r in runs),
            "median node": statistics.median(r["node"] for r in runs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", choices=PIPELINES, action="append",
                        help="pipeline to measure (repeatable; default: both)")
    parser.add_argument("--slices", type=int, default=120)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quiet-period", type=float, default=1.0, help="completion quiet_period_s")
    parser.add_argument("--after-release", type=float, default=0.5, help="completion after_release_s")
    parser.add_argument("--verbose", action="store_true", help="print every run")
    args = parser.parse_args()
    if shutil.which("dciodvfy") is None:
        print("note: dciodvfy is not installed; the node validates without it", file=sys.stderr)
    print(f"{dt.date.today()}, {platform.node()}, {platform.processor() or platform.machine()}, "
          f"python {platform.python_version()}; phantom {args.slices} x {args.size} x {args.size}, "
          f"best and median of {args.repeats}; completion quiet {args.quiet_period:g} s, after release "
          f"{args.after_release:g} s (subtracted)")
    rows = {}
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
        for pipeline in args.pipeline or PIPELINES:
            rows[pipeline] = run_pipeline(pipeline, args.slices, args.size, args.repeats, args.quiet_period,
                                          args.after_release, Path(tmp) / pipeline, args.verbose)
    print()
    header = (f"{'pipeline':<15} {'bare call s':>11} {'node s':>7} {'ratio':>6} {'median ratio':>12} "
              f"{'fixed s':>8}   " + " ".join(f"{s:>8}" for s in STAGES))
    print(header)
    for pipeline, r in rows.items():
        print(f"{pipeline:<15} {r['bare']:>11.2f} {r['node']:>7.2f} {r['node'] / r['bare']:>6.2f} "
              f"{r['median node'] / r['median bare']:>12.2f} {r['fixed']:>8.2f}   "
              + " ".join(f"{r[s]:>8.3f}" for s in STAGES))
    print()
    print("sched =  routed (assemble loop) + claimed (worker thread) + worker_ipc (to the process and back)"
          " + dispatched (dispatcher):")
    for pipeline, r in rows.items():
        print(f"{pipeline:<15} " + ", ".join(f"{k} {r[k]:.3f}" for k in ("routed", "claimed", "worker_ipc",
                                                                           "dispatched"))
              + f"; completion wait subtracted {r['wait']:.3f}")
    print(json.dumps({p: {k: round(v, 4) for k, v in r.items()} for p, r in rows.items()}))


if __name__ == "__main__":
    main()
