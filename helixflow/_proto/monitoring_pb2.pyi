from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetHealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthReport(_message.Message):
    __slots__ = ("status", "services", "generated_at_unix")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    SERVICES_FIELD_NUMBER: _ClassVar[int]
    GENERATED_AT_UNIX_FIELD_NUMBER: _ClassVar[int]
    status: str
    services: _containers.RepeatedCompositeFieldContainer[ServiceHealth]
    generated_at_unix: float
    def __init__(self, status: _Optional[str] = ..., services: _Optional[_Iterable[_Union[ServiceHealth, _Mapping]]] = ..., generated_at_unix: _Optional[float] = ...) -> None: ...

class ServiceHealth(_message.Message):
    __slots__ = ("name", "state", "detail", "since_unix", "last_probe_unix", "probe_ms", "endpoint")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    SINCE_UNIX_FIELD_NUMBER: _ClassVar[int]
    LAST_PROBE_UNIX_FIELD_NUMBER: _ClassVar[int]
    PROBE_MS_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    name: str
    state: str
    detail: str
    since_unix: float
    last_probe_unix: float
    probe_ms: float
    endpoint: str
    def __init__(self, name: _Optional[str] = ..., state: _Optional[str] = ..., detail: _Optional[str] = ..., since_unix: _Optional[float] = ..., last_probe_unix: _Optional[float] = ..., probe_ms: _Optional[float] = ..., endpoint: _Optional[str] = ...) -> None: ...
