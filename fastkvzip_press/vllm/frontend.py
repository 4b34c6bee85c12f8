"""Front-end side (the process that takes requests): a request's Fast KVzip settings are checked with the rest of
its sampling parameters, so a bad value becomes an error response (HTTP 400) and the engine keeps serving; an
engine configuration the compaction cannot serve is refused before any engine process starts."""

from __future__ import annotations

from vllm.engine.arg_utils import EngineArgs
from vllm.exceptions import VLLMValidationError
from vllm.v1.engine.input_processor import InputProcessor

from fastkvzip_press.vllm.engine_checks import check_engine
from fastkvzip_press.vllm.settings import REQUEST_RATIO, EngineSettings, RequestSettingError, check_request

_original_validate_params = InputProcessor._validate_params
_original_create_engine_config = EngineArgs.create_engine_config


def _create_engine_config(self, *args, **kwargs):
    vllm_config = _original_create_engine_config(self, *args, **kwargs)
    check_engine(vllm_config)  # refuse before any process starts
    return vllm_config


def _validate_params(self, params, *args, **kwargs):
    result = _original_validate_params(self, params, *args, **kwargs)
    extra_args = getattr(params, "extra_args", None)
    if extra_args and REQUEST_RATIO in extra_args:  # most requests carry no Fast KVzip setting: nothing to parse
        settings = EngineSettings.from_additional_config(self.vllm_config.additional_config)
        try:
            check_request(extra_args, settings)
        except RequestSettingError as error:
            raise VLLMValidationError(str(error), parameter="extra_args") from None
    return result


def install() -> None:
    EngineArgs.create_engine_config = _create_engine_config
    InputProcessor._validate_params = _validate_params
