"""The reconciler's diff (pure): what starts, restarts, stops, and what fails on its own."""

from __future__ import annotations

from edge.reconcile import plan_services
from edge.services import ServiceSpec


def spec(name: str, *command: str, depends_on: tuple[str, ...] = ()) -> ServiceSpec:
    return ServiceSpec(name=name, command=command or ("/bin/true",), depends_on=depends_on)


def test_new_changed_removed_and_unchanged_services_are_told_apart() -> None:
    current = {"a": spec("a"), "b": spec("b"), "c": spec("c")}
    wanted = {"a": spec("a"), "b": spec("b", "/bin/sleep", "5"), "d": spec("d")}
    plan = plan_services({}, current, wanted)
    assert dict(plan.start) == {"d": wanted["d"]}
    assert dict(plan.replace) == {"b": wanted["b"]}
    assert plan.remove == ("c",)
    assert plan.unchanged == ("a",)
    assert not plan.failed


def test_a_name_of_the_config_file_is_not_the_registrys_to_take() -> None:
    fixed = {"web": spec("web")}
    plan = plan_services(fixed, {}, {"web": spec("web", "/bin/evil"), "x": spec("x")})
    assert "config file" in plan.failed["web"]
    assert list(plan.start) == ["x"]


def test_a_desired_service_may_depend_on_a_config_file_service() -> None:
    fixed = {"broker": spec("broker")}
    plan = plan_services(fixed, {}, {"app": spec("app", depends_on=("broker",))})
    assert list(plan.start) == ["app"] and not plan.failed


def test_a_missing_dependency_fails_that_service_and_what_depends_on_it_only() -> None:
    wanted = {
        "a": spec("a", depends_on=("ghost",)),
        "b": spec("b", depends_on=("a",)),
        "c": spec("c"),
    }
    plan = plan_services({}, {}, wanted)
    assert "ghost" in plan.failed["a"]
    assert "a" in plan.failed["b"]
    assert list(plan.start) == ["c"]


def test_a_failed_update_keeps_the_version_that_ran_before() -> None:
    current = {"a": spec("a", "/bin/old")}
    plan = plan_services({}, current, {"a": spec("a", "/bin/new")},
                         refused={"a": "no such user 'x'"})
    assert plan.failed == {"a": "no such user 'x'"}
    assert plan.kept == ("a",)
    assert plan.remove == () and not plan.replace


def test_a_kept_old_version_whose_dependency_goes_is_removed() -> None:
    current = {"a": spec("a"), "b": spec("b", "/bin/old", depends_on=("a",))}
    plan = plan_services({}, current, {"b": spec("b", "/bin/new", depends_on=("a",))},
                         refused={"b": "no such user"})
    # "a" is no longer wanted, so the old "b" cannot go on either.
    assert set(plan.remove) == {"a", "b"}
    assert plan.kept == ()
    assert "a" in plan.failed["b"]


def test_a_dependency_cycle_among_new_services_applies_none_of_them() -> None:
    wanted = {"a": spec("a", depends_on=("b",)), "b": spec("b", depends_on=("a",))}
    plan = plan_services({}, {}, wanted)
    assert set(plan.failed) == {"a", "b"} and "cycle" in plan.failed["a"]
    assert not plan.start


def test_an_empty_desired_state_removes_every_desired_service() -> None:
    plan = plan_services({"web": spec("web")}, {"a": spec("a"), "b": spec("b")}, {})
    assert set(plan.remove) == {"a", "b"} and not plan.start
