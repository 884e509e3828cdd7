"""The static hazard checker: each rule fires on a minimal program and stays quiet on clean code."""
import pytest

from tvm_qpu.codegen import assemble
from tvm_qpu.codegen.asm import *  # noqa: F401,F403
from tvm_qpu.codegen.examples import EXAMPLES
from tvm_qpu.codegen.hazards import RULES, HazardError, assert_no_hazards, check_program


def rules(fn, **kw):
    return {h.rule for h in check_program(assemble(fn), **kw)}


def test_examples_are_clean():
    for name, k in EXAMPLES.items():
        assert check_program(assemble(k)) == [], name


def test_branch_in_branch_delay_slot():
    def k():
        b(+8, cond="always")
        b(+8, cond="always")
        nop(); nop(); nop()
        thread_end()
    assert "branch_in_delay_slot" in rules(k)


def test_branch_in_thrsw_delay_slot():
    def k():
        nop(sig=thrsw)
        b(+8, cond="always")
        nop(); nop(); nop()
        thread_end()
    assert "branch_in_delay_slot" in rules(k)


def test_sfu_in_thrsw_delay_slot():
    def k():
        nop(sig=thrsw)
        nop()
        recip(rf1, rf2)
        thread_end()
    assert "sfu_in_thrsw_slot" in rules(k)

    def ok():
        nop(sig=thrsw)
        nop()
        nop()
        recip(rf1, rf2)
        thread_end()
    assert rules(ok) == set()


def test_thrsw_before_previous_took_effect():
    def k():
        nop(sig=thrsw)
        nop()
        nop(sig=thrsw)
        nop(); nop()
        thread_end()
    assert "thrsw_near_thrsw" in rules(k)
    # a Mesa-only rule: the hardware runs it as two ordinary switches (mode "hardware")
    assert "thrsw_near_thrsw" not in rules(k, mode="hardware")


def test_thread_end_thrsw_in_the_last_switch_pair_slots():
    def k():
        nop(sig=thrsw)
        nop(sig=thrsw)
        nop(sig=thrsw)
        nop(); nop(); nop()
    assert "thrsw_in_thrsw_slot" in rules(k)
    assert "thrsw_in_thrsw_slot" in rules(k, mode="hardware")


def test_branch_right_after_unifa_write_is_mesa_only():
    """Mesa's emit_branch keeps a branch 4+ instructions after a unifa write; py-videocore7's
    test_unifa (case 3, run on a Pi 5) branches right after one."""
    def k():
        mov(unifa, rf1)
        b(+8, cond="always")
        nop(); nop(); nop()
        thread_end()
    assert "branch_after_unifa" in rules(k)
    assert rules(k, mode="hardware") == set()


def test_split_by_mode_rejects_unknown_modes():
    from tvm_qpu.codegen.hazards import split_by_mode
    with pytest.raises(ValueError, match="hazard mode"):
        split_by_mode([], "lenient")


def test_thread_end_writing_registers():
    def k():
        nop(sig=thrsw)
        nop(sig=thrsw)
        nop()
        nop()
        add(rf1, rf2, rf3, sig=thrsw)
        nop(); nop(); nop()
    assert "thrend_writes_rf" in rules(k)


def test_uniform_load_in_thread_end_slot():
    def k():
        nop(sig=thrsw)
        nop(sig=thrsw)
        nop(); nop()
        nop(sig=thrsw)
        nop(sig=ldunif)
        nop(); nop()
    assert "uniform_in_thrend_slot" in rules(k)


@pytest.mark.parametrize("build", [
    lambda: mov(tmua, rf1).mov(tmud, rf2),
    lambda: recip(rf1, rf2).mov(tmua, rf3),
    lambda: mov(tmua, rf1, sig=wrtmuc).mov(syncb, rf2),
    lambda: mov(vpm, rf1).mov(tmua, rf2),
])
def test_more_than_one_exclusive_access(build):
    def k():
        build()
        thread_end()
    assert "resource_conflict" in rules(k)


def test_wrtmuc_with_tmu_write_is_allowed():
    def k():
        mov(tmua, rf1, sig=wrtmuc)
        thread_end()
    assert rules(k) == set()


def test_unifa_window_crossing_a_thread_switch():
    def k():
        nop(sig=thrsw)
        mov(unifa, rf1)
        nop(); nop(); nop()
        thread_end()
    assert "unifa_thrsw" in rules(k)

    def ok():
        mov(unifa, rf1)
        nop(sig=thrsw)          # switches after pc 3: outside the window (Mesa's rule)
        nop(); nop(); nop()
        thread_end()
    assert "unifa_thrsw" not in rules(ok)


def test_ldunifa_too_early():
    def k():
        mov(unifa, rf1)
        nop()
        nop(sig=ldunifa)
        thread_end()
    assert "unifa_latency" in rules(k)


def test_missing_and_truncated_thread_end():
    def k():
        nop()
    assert "no_thread_end" in rules(k)

    def t():
        nop(sig=thrsw)
        nop(sig=thrsw)
        nop(); nop()
        nop(sig=thrsw)
    assert "thrend_truncated" in rules(t)


def test_undefined_word_is_a_hazard():
    assert {h.rule for h in check_program([0, 0x38003186bb03f000], require_thread_end=False)} == {"undefined"}


def test_hazard_error_lists_them():
    def k():
        b(+8, cond="always")
        b(+8, cond="always")
        nop(); nop(); nop()
        thread_end()
    with pytest.raises(HazardError, match=r"pc 1: \[branch_in_delay_slot\]"):
        assert_no_hazards(assemble(k), "k")


def test_every_rule_is_documented_and_reachable_in_tests():
    import pathlib
    src = pathlib.Path(__file__).read_text()
    for r in RULES:
        assert r in src or r == "undefined", r
