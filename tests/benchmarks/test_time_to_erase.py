"""The time-to-erase table: the erase point is the first evaluation passing both bars."""

from benchmarks.time_to_erase import erase_point, table_row


def entry(step, seconds, target, synonym, retained):
    return {"step": step, "train_seconds": seconds,
            "efficacy/target_acc": target, "efficacy/target_acc_ci95": [max(target - 0.1, 0), target + 0.1],
            "generality/synonym_acc": synonym, "generality/synonym_acc_ci95": [max(synonym - 0.1, 0), synonym + 0.1],
            "specificity/retained_acc": retained, "specificity/retained_acc_ci95": [retained - 0.05, min(retained + 0.05, 1)]}


def run(history, retained_before=1.0):
    return {"before": {"specificity/retained_acc": retained_before}, "history": history,
            "seconds": {"fit": history[-1]["train_seconds"]}}


def test_erase_point_needs_the_target_bar_and_the_retained_floor():
    slow = run([entry(10, 8.0, 0.30, 0.3, 1.0), entry(20, 16.0, 0.05, 0.1, 0.95),  # retained fell 5 points
                entry(30, 24.0, 0.09, 0.1, 0.97), entry(40, 32.0, 0.0, 0.0, 1.0)])
    assert erase_point(slow)["step"] == 30  # 0.97 is exactly 3 points under 1.00
    assert erase_point(run([entry(10, 8.0, 0.11, 0.1, 1.0)])) is None


def test_speed_up_and_intervals_are_against_the_baseline():
    baseline = table_row("esd", "paper", run([entry(10, 8.0, 0.5, 0.5, 1.0), entry(20, 40.0, 0.06, 0.09, 0.98)]), None)
    assert baseline["time_to_erase_s"] == 40.0 and baseline["speed_up"] is None
    fast = table_row("esd", "bank", run([entry(10, 5.0, 0.03, 0.12, 0.99)]), baseline)
    assert fast["speed_up"] == 8.0 and fast["within_baseline"] is True
    off = table_row("esd", "bank", run([entry(10, 5.0, 0.03, 0.25, 0.99)]), baseline)  # synonym above [0, 0.19]
    assert off["within_baseline"] is False
    # passes its own bar (0.95 before) but its retained is below the baseline's [0.93, 1]
    lost = table_row("esd", "bank", run([entry(10, 5.0, 0.03, 0.05, 0.92)], retained_before=0.95), baseline)
    assert lost["within_baseline"] is False
    deeper = table_row("esd", "bank", run([entry(10, 5.0, 0.0, 0.0, 1.0)]), baseline)  # better than the interval
    assert deeper["within_baseline"] is True
    never = table_row("esd", "bank", run([entry(10, 5.0, 0.5, 0.5, 1.0)]), baseline)
    assert never["time_to_erase_s"] is None and never["speed_up"] is None
