"""Who ran each electron, as `jobs`, `cost` and `logs` show it: an electron's claim names the Batch
job (a warm VM's) that ran it; an electron without one ran on its own job. A warm VM is counted
once, with the nodes of the dispatch that ran on it and how many electrons of other dispatches."""

from __future__ import annotations

import io
import json
from datetime import datetime, timedelta, timezone

import pytest
from click.testing import CliRunner
from fake_bucket import FakeBucket
from google.cloud import batch_v1

from covalent_gcpbatch_plugin import cli, protocol, usage, watch
from covalent_gcpbatch_plugin.protocol.warm import KEY_LENGTH

DISPATCH = "5f1c0d2e-8a7b-4c3d-9e0f-123456789abc"
OTHER = "aaaa1111-2222-3333-4444-555555555555"
VM = "cov-5f1c0d2e-0-aaaa"  # node 0's job, kept warm: it ran nodes 0, 1 and 2
OWN = "cov-5f1c0d2e-3-bbbb"  # node 3: not warm, its own job, no claim
ALONE = "cov-5f1c0d2e-5-kkkk"  # node 5: kept warm, it ran only itself of this dispatch, then one of OTHER
FOREIGN_VM = "cov-aaaa1111-0-cccc"  # another dispatch's warm VM: it ran node 4 of this one, and 2 of its own
NOW = datetime.now(timezone.utc)


def claim(runner: str) -> bytes:
    return protocol.Claim(runner=runner, job_uid=f"uid-{runner}").dumps()


def electron(job_id: str, runner: str | None, stdout: str = "") -> dict[str, bytes]:
    objects = protocol.TaskObjects(job_id)
    found = {objects.result: b"r", objects.stdout(0): stdout.encode()}
    if runner is not None:
        found[objects.claim] = claim(runner)
    return found


def taken(runner: str, job_id: str, seq: int, created: datetime) -> dict[str, bytes]:
    """A taken idle record of ``runner``'s VM: the offer of ``job_id`` to it."""
    until = created.timestamp() + 30 * seq
    idle = protocol.IdleVM(key="0" * KEY_LENGTH, runner=runner, seq=seq, until=until, ends=until + 600)
    offer = protocol.Offer(job_id=job_id, key=idle.key, runner=runner, seq=seq, take_by=until + 5)
    return {idle.name: idle.model_dump_json().encode(), idle.taken: offer.dumps()}


def batch_job(job_id: str, dispatch: str, node: str, ran_s: float, created: datetime) -> batch_v1.Job:
    job = batch_v1.Job(name=f"projects/p/locations/us-east1/jobs/{job_id}",
                       labels={"covalent-dispatch-id": dispatch, "covalent-node-id": node})  # fmt: skip
    job.create_time = created
    job.update_time = created + timedelta(seconds=ran_s + 1)
    job.status.state = batch_v1.JobStatus.State.SUCCEEDED
    job.status.run_duration = timedelta(seconds=ran_s)
    return job


@pytest.fixture
def stored(monkeypatch):
    """Nodes 0-2 ran on VM, node 3 on its own job, node 4 on FOREIGN_VM, which also ran two
    electrons of OTHER (its own first one, and one offered) and was offered one more that it did
    not claim in time (its claim names another runner); node 5 on its own job ALONE, whose VM
    then ran one electron of OTHER."""
    vm_created, foreign_created = NOW - timedelta(seconds=600), NOW - timedelta(seconds=900)
    objects = {
        **electron(VM, VM, "zero\n"), **electron("cov-5f1c0d2e-1-dddd", VM, "one\n"),
        **electron("cov-5f1c0d2e-2-eeee", VM, "two\n"), **electron(OWN, None, "three\n"),
        **electron("cov-5f1c0d2e-4-ffff", FOREIGN_VM, "four\n"),
        **taken(VM, "cov-5f1c0d2e-1-dddd", 1, vm_created), **taken(VM, "cov-5f1c0d2e-2-eeee", 2, vm_created),
        **electron(FOREIGN_VM, FOREIGN_VM), **electron("cov-aaaa1111-1-gggg", FOREIGN_VM),
        **electron("cov-aaaa1111-2-hhhh", "cov-aaaa1111-2-iiii"),
        **taken(FOREIGN_VM, "cov-aaaa1111-1-gggg", 1, foreign_created),
        **taken(FOREIGN_VM, "cov-5f1c0d2e-4-ffff", 2, foreign_created),
        **taken(FOREIGN_VM, "cov-aaaa1111-2-hhhh", 3, foreign_created),
        **electron(ALONE, ALONE, "five\n"), **electron("cov-aaaa1111-3-llll", ALONE),
        **taken(ALONE, "cov-aaaa1111-3-llll", 1, NOW - timedelta(seconds=200)),
    }
    labelled = [batch_job(ALONE, DISPATCH, "5", 80.0, NOW - timedelta(seconds=200)),
                batch_job(OWN, DISPATCH, "3", 20.0, NOW - timedelta(seconds=300)),
                batch_job(VM, DISPATCH, "0", 150.0, vm_created)]  # fmt: skip
    by_id = {protocol.job_id_of_job_name(j.name): j for j in labelled}
    by_id[FOREIGN_VM] = batch_job(FOREIGN_VM, OTHER, "0", 200.0, foreign_created)
    fetched: list[str] = []

    def get(deployment, job_id):
        fetched.append(job_id)
        return by_id.get(job_id)

    here = watch.Deployment("my-project", "us-east1", "my-bucket", "", "batch.local:1")
    monkeypatch.setattr(watch.Deployment, "from_config", classmethod(lambda cls: here))
    monkeypatch.setattr(watch.Deployment, "bucket", lambda self: FakeBucket(objects))
    monkeypatch.setattr(watch, "dispatch_jobs", lambda deployment, dispatch_id: list(labelled))
    monkeypatch.setattr(watch, "_job", get)
    return fetched


def test_claims_map_each_electron_to_its_runner():
    names = [protocol.TaskObjects(VM).claim, protocol.TaskObjects(OWN).result,
             protocol.TaskObjects("cov-5f1c0d2e-1-dddd").claim, protocol.PackObjects("cov-5f1c0d2e-pack-x1").manifest]
    assert watch.claimed_job_ids(names) == [VM, "cov-5f1c0d2e-1-dddd"]
    claims = {VM: protocol.Claim(runner=VM), "cov-5f1c0d2e-1-dddd": protocol.Claim(runner=VM)}
    runners = watch.runners_of(watch.job_ids_in(names), claims)
    assert runners == {VM: VM, "cov-5f1c0d2e-1-dddd": VM, OWN: OWN}, "a pack's id is no electron"
    assert watch.nodes_by_runner(runners) == {VM: ["0", "1"], OWN: ["3"]}
    assert watch.warm_runners(claims) == {VM}


def test_a_job_no_claim_names_keeps_its_label_and_one_that_lost_its_claim_ran_nothing():
    pack = batch_job("cov-5f1c0d2e-pack-x1", DISPATCH, "5", 10.0, NOW)
    lost = batch_job("cov-5f1c0d2e-6-jjjj", DISPATCH, "6", 10.0, NOW)
    runners = {"cov-5f1c0d2e-6-jjjj": VM}
    assert watch.nodes_on(pack, runners) == ["5"]
    assert watch.nodes_on(lost, runners) == []


def test_only_claimed_electrons_of_other_dispatches_count_on_a_vm():
    offers = [protocol.Offer(job_id=j, key="0" * KEY_LENGTH, runner=FOREIGN_VM, seq=1, take_by=1.0)
              for j in ("cov-aaaa1111-1-gggg", "cov-5f1c0d2e-4-ffff", "cov-aaaa1111-2-hhhh")]
    candidates = watch.foreign_candidates(FOREIGN_VM, DISPATCH, offers)
    assert candidates == [FOREIGN_VM, "cov-aaaa1111-1-gggg", "cov-aaaa1111-2-hhhh"]
    claims = {FOREIGN_VM: protocol.Claim(runner=FOREIGN_VM), "cov-aaaa1111-1-gggg": protocol.Claim(runner=FOREIGN_VM),
              "cov-aaaa1111-2-hhhh": protocol.Claim(runner="cov-aaaa1111-2-iiii")}
    assert watch.ran_on(FOREIGN_VM, candidates, claims) == [FOREIGN_VM, "cov-aaaa1111-1-gggg"]


def test_the_idle_window_holds_the_vms_records():
    job = batch_job(VM, DISPATCH, "0", 150.0, NOW - timedelta(seconds=600))
    start, end = watch.idle_window(job)
    record = protocol.IdleVM(key="0" * KEY_LENGTH, runner=VM, seq=1,
                             until=(NOW - timedelta(seconds=400)).timestamp(), ends=NOW.timestamp())
    assert start <= record.name < end
    job.status.state = batch_v1.JobStatus.State.RUNNING
    assert watch.idle_window(job) == (start, None), "a VM still running may write records yet"


def test_jobs_lists_every_vm_once_with_the_nodes_it_ran(stored):
    rows = []
    assert watch.jobs(DISPATCH, cancel=False, out=io.StringIO(), show=rows.extend) == 0
    assert [(r["job"], r["nodes"], r["other_dispatches"]) for r in rows] == [
        (ALONE, ["5"], 1), (OWN, ["3"], None), (VM, ["0", "1", "2"], 0), (FOREIGN_VM, ["4"], 2)]
    assert stored == [FOREIGN_VM], "only the runner no label query found is fetched"
    table = CliRunner().invoke(cli.app, ["jobs", DISPATCH])
    assert table.exit_code == 0, table.output
    lines = table.stdout.splitlines()
    assert lines[0].split()[-1] == "ELECTRONS"
    (vm_line,) = [line for line in lines if line.startswith(VM)]
    assert vm_line.rstrip().endswith("0, 1, 2")
    (foreign_line,) = [line for line in lines if line.startswith(FOREIGN_VM)]
    assert foreign_line.rstrip().endswith("4 +2 of other dispatches")
    listed = json.loads(CliRunner().invoke(cli.app, ["jobs", DISPATCH, "--json"]).stdout)
    assert listed[2]["nodes"] == ["0", "1", "2"]


def test_jobs_cancel_leaves_another_dispatchs_vm_alone(stored, monkeypatch):
    seen = []

    def cancel(deployment, found, out, status_of, **_):
        seen.extend(protocol.job_id_of_job_name(j.name) for j in found)
        return 0

    monkeypatch.setattr(watch, "cancel_orphans", cancel)
    assert watch.jobs(DISPATCH, cancel=True, out=io.StringIO()) == 0
    assert seen == [ALONE, OWN, VM]


def test_cost_counts_each_vm_once_and_names_a_shared_one(stored):
    report = watch.cost_report(DISPATCH, None)
    rows = {r["job"]: r for r in report["jobs"]}
    assert list(rows) == [ALONE, OWN, VM, FOREIGN_VM] and report["vms"] == 4
    assert rows[VM]["nodes"] == ["0", "1", "2"] and rows[VM]["vm_s"] == 150.0 and rows[VM]["other_dispatches"] == 0
    assert rows[FOREIGN_VM]["nodes"] == ["4"] and rows[FOREIGN_VM]["vm_s"] == 200.0
    assert report["vm_s"] == 80.0 + 20.0 + 150.0 + 200.0 and report["billed_s"] == 80 + 60 + 150 + 200
    assert report["usd"] == pytest.approx(sum(r["usd"] for r in rows.values()))
    assert report["shared_vms"] == [ALONE, FOREIGN_VM] and "counted whole" in report["note"]
    vm = usage.usage_of(batch_job(VM, DISPATCH, "0", 150.0, NOW))
    assert rows[VM]["usd"] == pytest.approx(usage.estimate(vm), abs=1e-6), "the VM once, not once per electron"
    drawn = CliRunner().invoke(cli.app, ["cost", DISPATCH])
    assert drawn.exit_code == 0 and "2 warm VM(s) also ran electrons of other dispatches" in drawn.stdout
    (vm_line,) = [line for line in drawn.stdout.splitlines() if line.startswith(VM)]
    assert vm_line.rstrip().endswith("0, 1, 2")


def test_logs_of_a_warm_electron_are_its_own_headed_with_its_vm(stored):
    out = io.StringIO()
    assert watch.logs(DISPATCH, 1, follow=False, out=out) == 0
    text = out.getvalue()
    assert text.startswith(f"== node 1 (ran on the warm VM of Batch job {VM}; its own objects: "
                           f"{protocol.TaskObjects('cov-5f1c0d2e-1-dddd').prefix})\n"), text
    assert "one\n" in text and "zero" not in text and "two" not in text
    out = io.StringIO()
    assert watch.logs(DISPATCH, 3, follow=False, out=out) == 0
    assert out.getvalue().startswith(f"== node 3 (Batch job {OWN})\n") and "three\n" in out.getvalue()
    out = io.StringIO()
    assert watch.logs(DISPATCH, 0, follow=False, out=out) == 0
    assert out.getvalue().startswith(f"== node 0 (Batch job {VM})\n"), "the VM's own electron ran on its own job"


class CancelRecorder:
    """Batch's cancel_job, as `jobs --cancel` calls it: the names it was asked to cancel."""

    def __init__(self) -> None:
        self.cancelled: list[str] = []

    def cancel_job(self, name: str, **_) -> None:
        self.cancelled.append(protocol.job_id_of_job_name(name))


def test_jobs_cancel_keeps_a_warm_vm_that_runs_another_dispatchs_electron(monkeypatch):
    """A warm VM's labels name its first electron's dispatch, which may have ended while the VM
    runs an electron of another: `jobs --cancel` (even --force) keeps it until that electron's
    outcome is stored, then cancels it like any job left behind."""
    created = NOW - timedelta(seconds=120)
    running = "cov-aaaa1111-1-gggg"
    objects = {**electron(VM, VM), **taken(VM, "cov-5f1c0d2e-1-dddd", 1, created), **electron("cov-5f1c0d2e-1-dddd", VM),
               **taken(VM, running, 2, created), protocol.TaskObjects(running).claim: claim(VM)}
    job = batch_job(VM, DISPATCH, "0", 100.0, created)
    job.status.state = batch_v1.JobStatus.State.RUNNING
    batch = CancelRecorder()
    here = watch.Deployment("my-project", "us-east1", "my-bucket", "", "batch.local:1")
    monkeypatch.setattr(watch.Deployment, "bucket", lambda self: FakeBucket(objects))
    monkeypatch.setattr(watch.Deployment, "batch", lambda self: batch)
    ended = lambda dispatch: (watch.ENDED, "COMPLETED")  # noqa: E731 - the first electron's dispatch

    out = io.StringIO()
    assert watch.cancel_orphans(here, [job], out, ended, force=True, yes=True) == 0
    assert batch.cancelled == [] and f"kept {VM}: its warm VM runs electron {running}" in out.getvalue(), out.getvalue()
    objects[protocol.TaskObjects(running).result] = b"r"
    out = io.StringIO()
    assert watch.cancel_orphans(here, [job], out, ended, yes=True) == 0
    assert batch.cancelled == [VM], out.getvalue()


def test_the_electron_a_warm_vm_runs_is_its_last_claimed_one_with_no_outcome():
    offers = [protocol.Offer(job_id=j, key="0" * KEY_LENGTH, runner=VM, seq=seq, take_by=1.0)
              for seq, j in enumerate(("cov-5f1c0d2e-1-dddd", "cov-aaaa1111-1-gggg", "cov-aaaa1111-2-hhhh"), 1)]
    claims = {"cov-5f1c0d2e-1-dddd": protocol.Claim(runner=VM), "cov-aaaa1111-1-gggg": protocol.Claim(runner=VM),
              "cov-aaaa1111-2-hhhh": protocol.Claim(runner="cov-aaaa1111-2-iiii")}
    assert watch.running_electron(VM, offers, claims, ended=["cov-5f1c0d2e-1-dddd"]) == "cov-aaaa1111-1-gggg"
    assert watch.running_electron(VM, offers, claims, ended=["cov-5f1c0d2e-1-dddd", "cov-aaaa1111-1-gggg"]) is None, \
        "an offer claimed by another runner is not this VM's"
    assert watch.running_electron(VM, [], {}, ended=[]) is None
