"""Pipeline strings: parsing, printing, errors, named pipelines, pass options."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from graphopt.errors import PipelineError
from graphopt.pipeline import (FixpointStep, Pass, PassContext, PassManager, PassRegistry, PassResult,
                               PassStep, format_pipeline, parse_pipeline)


class Tunable(Pass):
    """A pass with options, to check how options reach the instance."""

    name = "tunable"
    options = {"k": 1, "max_bytes": 64, "mode": "fast", "strict": False}

    def run(self, model, ctx) -> PassResult:
        return PassResult(False)


def test_parse_builds_the_tree(registry: PassRegistry) -> None:
    steps = parse_pipeline("count-nodes, fixpoint<max=3>(remove-identity,crash), remove-one-identity",
                           registry)
    assert steps == [PassStep("count-nodes"),
                     FixpointStep([PassStep("remove-identity"), PassStep("crash")], 3),
                     PassStep("remove-one-identity")]


@pytest.mark.parametrize("text", [
    "a",
    "a,b,c",
    "a<k=3>,b<name=x,flag=true,ratio=0.5>",
    "fixpoint(a,b)",
    "fixpoint<max=8>(a,fixpoint<max=2>(b,c),d),e",
    'a<path="x,y<z>",n="3",neg=-2,b="true">',
    "a<eps=1e-05>",
    "a<big=1e+16,small=-2.5e-07>",
])
def test_printed_pipeline_parses_back_to_the_same(text: str) -> None:
    steps = parse_pipeline(text)
    printed = format_pipeline(steps)
    assert parse_pipeline(printed) == steps
    assert format_pipeline(parse_pipeline(printed)) == printed


def test_string_values_keep_their_type_through_printing() -> None:
    steps = parse_pipeline('a<n="3",flag="true",word=hello,num=3,on=true>')
    assert steps[0].options == {"n": "3", "flag": "true", "word": "hello", "num": 3, "on": True}
    assert parse_pipeline(str(steps[0]))[0].options == steps[0].options


_names = st.sampled_from(["a", "fold-constants", "b2", "x-1-y", "topo-sort"])
_values = st.one_of(st.integers(-1000, 1000), st.booleans(),
                    st.floats(allow_nan=False, allow_infinity=False, width=32),
                    st.text(alphabet="aZ09_.+-,<>()= ", max_size=6))
_pass_steps = st.builds(PassStep, _names, st.dictionaries(_names, _values, max_size=2))
_steps = st.recursive(_pass_steps, lambda inner: st.builds(
    FixpointStep, st.lists(inner, min_size=1, max_size=3), st.one_of(st.none(), st.integers(1, 9))),
    max_leaves=6)


@settings(max_examples=60, deadline=None)
@given(st.lists(_steps, min_size=1, max_size=4))
def test_any_pipeline_round_trips(steps: list) -> None:
    assert parse_pipeline(format_pipeline(steps)) == steps


@pytest.mark.parametrize("text, message", [
    ("a,,b", "expected a pass name, found ','"),
    ("a<k>", "expected '=' but found '>'"),
    ("a<k=>", "option 'k' has no value"),
    ("a<=1>", "expected an option name"),
    ("a<k=1", "unexpected end of 'a<k=1' (expected '>')"),
    ("fixpoint(a", "unexpected end of 'fixpoint(a' (expected ')')"),
    ("fixpoint a", "expected '(' but found 'a'"),
    ("a)", "unexpected ')'"),
    ("a b", "separate passes with ','"),
    ("a;b", "unexpected character ';' at 1"),
    ("fixpoint<max=0>(a)", "fixpoint max must be a positive integer"),
    ("fixpoint<rounds=2>(a)", "fixpoint takes only 'max', not rounds"),
    ("a,", "unexpected end of 'a,'"),
])
def test_syntax_errors_say_what_and_where(text: str, message: str) -> None:
    with pytest.raises(PipelineError) as info:
        parse_pipeline(text)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_empty_pipeline_is_no_steps() -> None:
    assert parse_pipeline("  ") == []


def test_unknown_pass_suggests_near_names(registry: PassRegistry) -> None:
    with pytest.raises(PipelineError, match=r"unknown pass 'remove-identiy'; did you mean remove-identity"):
        parse_pipeline("count-nodes,remove-identiy", registry)
    with pytest.raises(PipelineError, match=r"unknown pass 'zzz'; run 'graphopt passes' to list them"):
        parse_pipeline("zzz", registry)


def test_unknown_pass_inside_fixpoint_is_reported(registry: PassRegistry) -> None:
    with pytest.raises(PipelineError, match="unknown pass 'count-node'; did you mean count-nodes"):
        parse_pipeline("fixpoint(remove-identity,count-node)", registry)


def test_named_pipelines_expand_in_place(registry: PassRegistry) -> None:
    registry.register_pipeline("tidy", "remove-identity,count-nodes")
    registry.register_pipeline("O1", "tidy,fixpoint<max=2>(remove-one-identity)")
    steps = parse_pipeline("crash,O1", registry)
    assert format_pipeline(steps) == "crash,remove-identity,count-nodes,fixpoint<max=2>(remove-one-identity)"
    assert parse_pipeline("-O1", registry) == parse_pipeline("O1", registry)
    assert registry.pipeline("-O1") == "tidy,fixpoint<max=2>(remove-one-identity)"


def test_named_pipeline_takes_no_options(registry: PassRegistry) -> None:
    registry.register_pipeline("tidy", "remove-identity")
    with pytest.raises(PipelineError, match="'tidy' is a named pipeline and takes no options"):
        parse_pipeline("tidy<k=1>", registry)


def test_self_including_named_pipeline_is_an_error(registry: PassRegistry) -> None:
    registry.register_pipeline("loop", "count-nodes,loop")
    with pytest.raises(PipelineError, match="nest more than 16 deep"):
        parse_pipeline("loop", registry)


def test_a_pass_wins_over_a_pipeline_of_the_same_name(registry: PassRegistry) -> None:
    registry.register_pipeline("count-nodes", "remove-identity")
    assert parse_pipeline("count-nodes", registry) == [PassStep("count-nodes")]


def test_options_reach_the_pass_instance(registry: PassRegistry) -> None:
    registry.register(Tunable)
    pm = PassManager("tunable<k=3,max-bytes=1024,mode=exact,strict=true>", PassContext(registry=registry))
    instance = pm._instance(pm.steps[0])
    assert instance.config == {"k": 3, "max_bytes": 1024, "mode": "exact", "strict": True}
    assert repr(instance) == "tunable<k=3,max-bytes=1024,mode=exact,strict=true>"
    assert pm.pipeline_text == "tunable<k=3,max-bytes=1024,mode=exact,strict=true>"


def test_a_pipeline_of_pass_instances_prints_as_a_parsable_string(registry: PassRegistry) -> None:
    registry.register(Tunable)
    pm = PassManager([Tunable(mode="a,b", strict=True), Tunable()], PassContext(registry=registry))
    assert pm.pipeline_text == 'tunable<mode="a,b",strict=true>,tunable'
    assert parse_pipeline(pm.pipeline_text, registry) == [PassStep("tunable", {"mode": "a,b", "strict": True}),
                                                           PassStep("tunable")]


def test_context_options_are_defaults_that_the_pipeline_overrides(registry: PassRegistry) -> None:
    registry.register(Tunable)
    ctx = PassContext(registry=registry, options={"tunable": {"k": 5, "max-bytes": 7}})
    pm = PassManager("tunable<k=3>", ctx)
    assert pm._instance(pm.steps[0]).config == {"k": 3, "max_bytes": 7, "mode": "fast", "strict": False}


def test_unknown_options_are_rejected_before_any_pass_runs(registry: PassRegistry) -> None:
    registry.register(Tunable)
    with pytest.raises(PipelineError) as info:
        PassManager("count-nodes,tunable<kk=3,speed=2>", PassContext(registry=registry))
    assert str(info.value) == ("pass 'tunable' has no option(s) kk, speed; "
                               "it accepts: k, max-bytes, mode, strict")
    with pytest.raises(PipelineError, match="pass 'count-nodes' has no option.* it accepts: none"):
        PassManager("count-nodes<k=1>", PassContext(registry=registry))


def test_pass_names_must_be_kebab_case() -> None:
    with pytest.raises(ValueError, match="must be kebab-case"):
        type("BadName", (Pass,), {"name": "Bad_Name"})
