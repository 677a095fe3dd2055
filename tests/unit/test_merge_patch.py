from kubeforge.controller.reconciler import merge_patch_diff


def test_equal_is_no_patch():
    assert merge_patch_diff({"a": 1, "b": {"c": [1]}}, {"a": 1, "b": {"c": [1]}}) is None


def test_changes_additions_and_removals():
    old = {"phase": "Running", "progress": {"step": 1, "eta": "5s"}, "backoffUntil": "x"}
    new = {"phase": "Running", "progress": {"step": 2}, "restarts": 1}
    assert merge_patch_diff(old, new) == {"progress": {"step": 2, "eta": None}, "backoffUntil": None, "restarts": 1}


def test_lists_are_replaced_whole():
    assert merge_patch_diff({"c": [{"t": "A"}]}, {"c": [{"t": "A"}, {"t": "B"}]}) == {"c": [{"t": "A"}, {"t": "B"}]}
