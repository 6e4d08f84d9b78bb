"""Warm VMs' pure rules: the warm key, idle records and their order, offers and electron state
messages (protocol/warm.py), the executor's view of who runs an electron (waiting.WarmWatch) and
a lost warm VM's next attempt (attempts.decide)."""

from __future__ import annotations

import pytest
from specs import spec as make_spec

from covalent_gcpbatch_plugin import protocol
from covalent_gcpbatch_plugin.attempts import AttemptEnd, NextAttempt, Policy, Settle, decide
from covalent_gcpbatch_plugin.protocol import JobState
from covalent_gcpbatch_plugin.waiting import OFFER_GRACE_S, WarmWatch

RUNNER = "cov-abcdef12-0-aaaa"
NOW = 1_800_000_000.0


def warm_spec(**changes):
    base = make_spec()
    options = base.options.model_copy(update={"keep_warm": 60, **changes.pop("options", {})})
    return base.model_copy(update={"options": options, **changes})


def idle(spec, *, until=NOW + 60, ends=NOW + 3600, seq=0, runner=RUNNER) -> protocol.IdleVM:
    return protocol.IdleVM(key=protocol.warm_key(spec), runner=runner, seq=seq, until=until, ends=ends)


def test_the_warm_key_ignores_the_node_and_its_deadline_only():
    spec = warm_spec()
    same = spec.model_copy(update={"node_id": 7, "dispatch_id": "another", "start_within_s": 12.0})
    assert protocol.warm_key(same) == protocol.warm_key(spec)
    for other in (warm_spec(vcpus=4), warm_spec(memory_mb=1024), warm_spec(container_image_uri="img:2"),
                  warm_spec(time_limit_s=99), warm_spec(options={"labels": {"team": "b"}}),
                  warm_spec(options={"provisioning": "SPOT"}), warm_spec(options={"keep_warm": 30})):
        assert protocol.warm_key(other) != protocol.warm_key(spec)


def test_idle_records_sort_by_when_their_vm_stops_waiting_and_parse_back():
    spec = warm_spec()
    soon, later = idle(spec, until=NOW + 10), idle(spec, until=NOW + 500, seq=3)
    assert soon.name < later.name and protocol.live_from(NOW) < soon.name
    assert protocol.live_from(NOW + 10) > soon.name, "a record with less than the margin left is not listed"
    assert protocol.idle_of_name(later.name) == (protocol.warm_key(spec), RUNNER, 3)
    assert protocol.idle_of_name(later.taken) is None
    assert protocol.idle_of_name("covalent-gcpbatch/warm/junk") is None


@pytest.mark.parametrize("record, takes", [
    (dict(), True),
    (dict(until=NOW + protocol.OFFER_MARGIN_S - 1), False),  # about to stop waiting
    (dict(ends=NOW + 300 + protocol.OFFER_MARGIN_S - 1), False),  # its job ends before the electron's time limit
])
def test_an_idle_vm_takes_an_electron_it_can_claim_and_finish(record, takes):
    spec = warm_spec(time_limit_s=300)
    assert idle(spec, **record).takes(spec, NOW) is takes
    assert not idle(spec, **record).takes(warm_spec(time_limit_s=300, vcpus=8), NOW)


def test_offers_and_electron_states_round_trip_and_refuse_what_is_not_theirs():
    offer = protocol.Offer(job_id="cov-abcdef12-3-bbbb", key="0" * 24, runner=RUNNER, seq=2, take_by=NOW + 10)
    data, attributes = offer.message()
    assert protocol.parse_offer(attributes, data) == offer
    assert protocol.parse_offer({**attributes, "Runner": "cov-other-0-x"}, data) is None
    assert protocol.parse_offer(attributes, b"{") is None
    data, attributes = protocol.electron_state_message(offer.job_id, RUNNER, JobState.QUEUED, "offered", take_by=NOW + 10)
    event = protocol.parse_electron_event(attributes, data)
    assert (event.job_id, event.state, event.runner, event.take_by) == (offer.job_id, JobState.QUEUED, RUNNER, NOW + 10)
    assert protocol.parse_notification(attributes, data) is None, "never read as Batch's own job message"
    assert protocol.parse_electron_event({**attributes, "NewJobState": "DELETION_IN_PROGRESS"}, data) is None
    assert protocol.parse_electron_event({**attributes, "JobId": "../x"}, data) is None


def test_the_claim_outlives_the_task_as_the_cancel_marker_does():
    objects = protocol.TaskObjects("cov-abcdef12-3-bbbb")
    assert not objects.disposable(objects.claim) and objects.disposable(objects.task)
    assert protocol.job_id_of_cold_object(objects.cold) == objects.job_id
    assert protocol.job_id_of_task_object(objects.cold) is None


def test_an_offer_not_claimed_by_its_take_by_asks_for_the_electrons_own_job():
    watch = WarmWatch()
    watch.offered(RUNNER, take_by=NOW + 10, wall=NOW, now=100.0)
    assert watch.timeout(100.0, 300.0) == pytest.approx(10 + OFFER_GRACE_S)
    assert not watch.cold_due(105.0) and watch.cold_due(100.0 + 10 + OFFER_GRACE_S)
    watch.sent_cold()
    assert watch.timeout(200.0, 300.0) == 300.0 and not watch.cold_due(1e9)


def test_a_claim_ends_the_offer_wait_and_says_where_the_electron_runs():
    watch = WarmWatch()
    watch.offered(RUNNER, take_by=NOW + 10, wall=NOW, now=100.0)
    watch.claimed(RUNNER)
    assert not watch.cold_due(1e9) and watch.elsewhere("cov-abcdef12-3-bbbb") and not watch.elsewhere(RUNNER)
    own = WarmWatch()
    own.claimed("cov-abcdef12-3-bbbb")
    assert not own.elsewhere("cov-abcdef12-3-bbbb")


def test_a_lost_warm_vm_runs_the_electron_again_within_its_retries():
    terms = Policy(retries=1).first("STANDARD", 256)
    lost = AttemptEnd(JobState.FAILED, lost_runner=RUNNER)
    decision = decide(lost, terms, [], Policy(retries=1))
    assert isinstance(decision, NextAttempt) and RUNNER in decision.why and decision.terms.retries == 0
    assert isinstance(decide(lost, terms, [lost], Policy(retries=1)), Settle), "retries spent"
    assert isinstance(decide(AttemptEnd(JobState.FAILED, lost_runner=RUNNER, has_result=True), terms, [], Policy(retries=1)),
                      Settle), "a stored result is the electron's"


def test_untaken_idle_records_are_the_vms_that_still_wait():
    spec = warm_spec()
    first, second = idle(spec, until=NOW + 20), idle(spec, until=NOW + 40, seq=1)
    names = sorted([first.name, first.taken, second.name, "covalent-gcpbatch/warm/not-a-record"])
    assert protocol.untaken_idle(names) == [(second.name, protocol.warm_key(spec))]


def test_the_vms_waiting_for_a_key_are_its_untaken_idle_records():
    spec, other = warm_spec(), warm_spec(vcpus=4)
    first, second = idle(spec, until=NOW + 20), idle(spec, until=NOW + 40, seq=1)
    elsewhere = idle(other, until=NOW + 30, runner="cov-other-0-x")
    names = sorted([first.name, first.taken, second.name, elsewhere.name])
    assert protocol.waiting_of_key(names, protocol.warm_key(spec)) == [second.name]
    assert protocol.waiting_of_key(names, protocol.warm_key(other)) == [elsewhere.name]
    assert protocol.waiting_of_key([first.name, first.taken], protocol.warm_key(spec)) == []


def test_an_offer_stands_until_its_vm_has_read_its_taken_record():
    spec = warm_spec()
    assert idle(spec, until=NOW + 3).take_by(NOW) == NOW + protocol.OFFER_TAKE_S
    assert idle(spec, until=NOW + 60).take_by(NOW) == NOW + 60 + protocol.OFFER_MARGIN_S


def test_a_sigkill_the_vm_did_not_send_is_out_of_memory_as_exit_137_is():
    import signal

    from covalent_gcpbatch_plugin import warm_worker
    from covalent_gcpbatch_plugin.attempts import MEMORY_ERROR

    assert warm_worker.error_type_of_exit(-signal.SIGKILL, stopped=False) == MEMORY_ERROR
    assert warm_worker.error_type_of_exit(-signal.SIGKILL, stopped=True) == warm_worker.STOPPED_TYPE, "its time limit"
    for code in (-signal.SIGSEGV, -signal.SIGTERM, 1, None):
        assert warm_worker.error_type_of_exit(code, stopped=False) == warm_worker.STOPPED_TYPE
