"""Bit-exactness against the golden V3D 7.1 corpus (tests/data/golden/, part of the repository)."""
import json

import pytest

from tvm_qpu.codegen import AsmError, assemble_text, decode, disassemble_word, encode

from conftest import GOLDEN


def _load(name):
    with open(GOLDEN / name) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def encodings():
    return _load("v3d71_encodings.jsonl")


@pytest.fixture(scope="module")
def rejected():
    return _load("v3d71_rejected.jsonl")


def test_every_golden_text_assembles_to_its_word(encodings):
    bad = [(e["text"], e["word"]) for e in encodings if assemble_text(e["text"]) != int(e["word"], 16)]
    assert len(encodings) == 12461
    assert not bad, f"{len(bad)} mismatches, first: {bad[:5]}"


def test_every_golden_word_disassembles_to_its_canonical_text(encodings):
    bad = [(e["word"], e["text"], disassemble_word(int(e["word"], 16))) for e in encodings
           if disassemble_word(int(e["word"], 16)) != e["text"]]
    assert not bad, f"{len(bad)} mismatches, first: {bad[:5]}"


def test_every_golden_word_round_trips_through_the_model(encodings):
    for e in encodings:
        w = int(e["word"], 16)
        assert encode(decode(w)) == w, e["text"]


def test_every_rejected_text_is_refused_with_a_clear_error(rejected):
    assert len(rejected) == 5113
    accepted = []
    for e in rejected:
        try:
            w = assemble_text(e["text"])
            accepted.append((e["text"], hex(w)))
        except AsmError:
            pass
    assert not accepted, f"{len(accepted)} accepted, first: {accepted[:5]}"


def test_rejection_messages_name_the_instruction(rejected):
    # Assembly errors name the instruction (its text) and the reason.
    for e in rejected:
        with pytest.raises(AsmError) as ei:
            assemble_text(e["text"])
        assert e["text"] in str(ei.value), (e["text"], str(ei.value))
