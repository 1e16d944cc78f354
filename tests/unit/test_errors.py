"""errors.py: one root, and ended-session errors that survive result backends."""

from __future__ import annotations

import inspect
import pickle

import pytest
from celery import Celery

import sessionflow
from sessionflow import errors
from sessionflow.errors import SessionClosed, SessionEnded, SessionFailed, SessionFlowError

ERROR_CLASSES = [
    obj
    for _, obj in inspect.getmembers(errors, inspect.isclass)
    if issubclass(obj, BaseException) and obj.__module__ == errors.__name__
]


def test_error_classes_found() -> None:
    assert len(ERROR_CLASSES) >= 11


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda c: c.__name__)
def test_every_error_is_a_sessionflow_error_with_docstring(cls: type[BaseException]) -> None:
    assert issubclass(cls, SessionFlowError)
    assert cls.__doc__ and cls.__doc__.strip()
    assert getattr(sessionflow, cls.__name__) is cls  # part of the public surface


def ended(cls: type[SessionEnded]) -> SessionEnded:
    return cls(f"session s-1 ended ({cls.__name__}); create a new session", "s-1", "worker_lost")


@pytest.fixture
def app() -> Celery:
    app = Celery("errs", set_as_current=False, backend="cache+memory://")
    app.conf.update(result_serializer="json", accept_content=["json"], result_accept_content=None)
    return app


@pytest.mark.parametrize("cls", [SessionClosed, SessionFailed])
def test_json_result_backend_round_trip(app: Celery, cls: type[SessionEnded]) -> None:
    original = ended(cls)
    backend = app.backend
    prepared = backend.prepare_exception(original, "json")
    wire = backend.encode(prepared)
    assert isinstance(wire, str)
    rebuilt = backend.exception_to_python(backend.decode(wire))
    assert isinstance(rebuilt, cls)
    assert rebuilt.session_id == "s-1"
    assert rebuilt.reason == "worker_lost"
    assert str(rebuilt) == str(original)
    assert str(rebuilt).startswith("session s-1 ended")


@pytest.mark.parametrize("cls", [SessionClosed, SessionFailed])
def test_json_round_trip_through_store_result(app: Celery, cls: type[SessionEnded]) -> None:
    app.backend.store_result("task-1", ended(cls), "FAILURE")
    result = app.AsyncResult("task-1")
    with pytest.raises(cls) as info:
        result.get(timeout=1)
    assert (info.value.session_id, info.value.reason) == ("s-1", "worker_lost")
    assert "create a new session" in str(info.value)


@pytest.mark.parametrize("cls", [SessionClosed, SessionFailed])
def test_pickle_round_trip(cls: type[SessionEnded]) -> None:
    original = ended(cls)
    rebuilt = pickle.loads(pickle.dumps(original))
    assert type(rebuilt) is cls
    assert (rebuilt.session_id, rebuilt.reason) == ("s-1", "worker_lost")
    assert str(rebuilt) == str(original)


OTHER_TRAVELLERS = [
    (errors.SessionTaskLost("task t-1 was lost", "s-1", "worker_lost"), {"session_id": "s-1"}),
    (errors.StateConflict("keys a, b changed", ["a", "b"]), {"keys": ["a", "b"]}),
    (errors.StateValueError("value of k is too big", "k"), {"key": "k"}),
    (errors.TurnLimitExceeded("session s-1 reached max_turns=3"), {}),
    (errors.SessionNotFound("no session 's-1' in the store"), {}),
]


@pytest.mark.parametrize(
    ("original", "attrs"), OTHER_TRAVELLERS, ids=lambda v: type(v).__name__ if v else ""
)
def test_other_errors_survive_json_and_pickle(
    app: Celery, original: Exception, attrs: dict[str, object]
) -> None:
    backend = app.backend
    over_json = backend.exception_to_python(
        backend.decode(backend.encode(backend.prepare_exception(original, "json")))
    )
    for rebuilt in (over_json, pickle.loads(pickle.dumps(original))):
        assert type(rebuilt) is type(original)
        assert str(rebuilt) == str(original)
        for name, value in attrs.items():
            assert getattr(rebuilt, name) == value


def test_ended_error_defaults() -> None:
    exc = SessionClosed("closed")
    assert (exc.session_id, exc.reason, str(exc)) == ("", "", "closed")
    assert exc.args == ("closed", "", "")
