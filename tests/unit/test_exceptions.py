import pickle

import pytest

import mineru_vram as mv
from mineru_vram import _exceptions


def _all_exception_classes() -> list[type[mv.MineruVramError]]:
    return [getattr(_exceptions, n) for n in _exceptions.__all__]


@pytest.mark.parametrize("cls", _all_exception_classes(), ids=lambda c: c.__name__)
def test_every_error_round_trips_through_pickle_with_attributes(cls: type[mv.MineruVramError]) -> None:
    exc = cls("doc.pdf: something went wrong", document="doc.pdf", exitcode=-9, log_tail="line1\nline2")
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is cls
    assert str(back) == "doc.pdf: something went wrong"
    assert back.document == "doc.pdf"
    assert back.exitcode == -9
    assert back.log_tail == "line1\nline2"


def test_stdlib_bases_are_mixed_in_where_the_meaning_matches() -> None:
    assert issubclass(mv.DocumentNotFoundError, FileNotFoundError)
    assert issubclass(mv.InvalidDocumentError, ValueError)
    assert issubclass(mv.ConfigurationError, ValueError)
    assert issubclass(mv.ParseTimeoutError, TimeoutError)
    assert issubclass(mv.AdmissionTimeoutError, TimeoutError)
    assert issubclass(mv.SessionStateError, RuntimeError)
    for cls in _all_exception_classes():
        assert issubclass(cls, mv.MineruVramError)


def test_nested_report_attribute_survives_pickle() -> None:
    exc = mv.VramLeakError("leak", report={"residual_mib": 40.0})
    assert pickle.loads(pickle.dumps(exc)).report == {"residual_mib": 40.0}


@pytest.mark.parametrize("cls", _all_exception_classes(), ids=lambda c: c.__name__)
def test_declared_attributes_read_none_when_a_raise_site_left_them_out(cls: type[mv.MineruVramError]) -> None:
    declared = _exceptions._declared(cls)
    exc = cls("bare")
    for name in declared:
        assert getattr(exc, name) is None, f"{cls.__name__}.{name}"
    assert pickle.loads(pickle.dumps(exc)).message == "bare"


def test_the_attributes_handlers_rely_on_are_declared() -> None:
    assert {"document", "exitcode", "signal", "pid", "log_tail"} <= set(_exceptions._declared(mv.WorkerCrashedError))
    assert {"document", "timeout"} <= set(_exceptions._declared(mv.ParseTimeoutError))
    assert {"need_mib", "free_mib", "device"} <= set(_exceptions._declared(mv.EngineAdmissionError))
    assert "path" in _exceptions._declared(mv.InsecurePathError)
    assert mv.WorkerCrashedError("x").exitcode is None
