"""helixflow.errors: one tree, HTTP statuses and OpenAI error objects."""

from __future__ import annotations

import pytest

from helixflow import errors

EXPECTED_STATUS = {
    errors.HelixFlowError: 500,
    errors.ConfigError: 500,
    errors.ModelLoadError: 500,
    errors.EngineDeadError: 503,
    errors.InvalidRequestError: 400,
    errors.AuthenticationError: 401,
    errors.PermissionDeniedError: 403,
    errors.NotFoundError: 404,
    errors.RateLimitError: 429,
    errors.OverloadedError: 503,
    errors.UpstreamTimeoutError: 504,
}


@pytest.mark.parametrize(("cls", "status"), EXPECTED_STATUS.items())
def test_status_and_openai_shape(cls: type[errors.HelixFlowError], status: int) -> None:
    exc = cls("something went wrong")
    assert isinstance(exc, errors.HelixFlowError)
    assert exc.status == status
    assert str(exc) == "something went wrong"
    body = exc.to_openai()
    assert list(body) == ["error"]
    assert body["error"] == {
        "message": "something went wrong",
        "type": cls.type,
        "param": None,
        "code": cls.code,
    }
    assert isinstance(body["error"]["type"], str)
    assert body["error"]["type"]


def test_every_public_error_is_covered() -> None:
    public = {
        obj
        for obj in vars(errors).values()
        if isinstance(obj, type) and issubclass(obj, errors.HelixFlowError)
        and not obj.__name__.startswith("_")
    }
    assert public == set(EXPECTED_STATUS)


def test_param_and_code_override_per_instance() -> None:
    exc = errors.NotFoundError(
        "The model `x` does not exist", param="model", code="model_not_found"
    )
    assert exc.to_openai()["error"] == {
        "message": "The model `x` does not exist",
        "type": "invalid_request_error",
        "param": "model",
        "code": "model_not_found",
    }
    assert errors.NotFoundError("other").code == "not_found"


def test_rate_limit_carries_retry_after() -> None:
    exc = errors.RateLimitError("Rate limit reached for requests", retry_after=1.5)
    assert exc.retry_after == 1.5
    assert exc.to_openai()["error"]["code"] == "rate_limit_exceeded"
    assert errors.RateLimitError("no hint").retry_after is None
