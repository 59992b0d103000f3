from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ValidateApiKeyRequest(_message.Message):
    __slots__ = ("api_key",)
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    api_key: str
    def __init__(self, api_key: _Optional[str] = ...) -> None: ...

class ValidateTokenRequest(_message.Message):
    __slots__ = ("token",)
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    token: str
    def __init__(self, token: _Optional[str] = ...) -> None: ...

class Principal(_message.Message):
    __slots__ = ("user_id", "username", "role", "scopes", "rpm_limit", "tpm_limit", "key_id", "token_id", "expires_at", "issued_at", "session_id")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    USERNAME_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    SCOPES_FIELD_NUMBER: _ClassVar[int]
    RPM_LIMIT_FIELD_NUMBER: _ClassVar[int]
    TPM_LIMIT_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    ISSUED_AT_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    username: str
    role: str
    scopes: _containers.RepeatedScalarFieldContainer[str]
    rpm_limit: int
    tpm_limit: int
    key_id: str
    token_id: str
    expires_at: float
    issued_at: float
    session_id: str
    def __init__(self, user_id: _Optional[str] = ..., username: _Optional[str] = ..., role: _Optional[str] = ..., scopes: _Optional[_Iterable[str]] = ..., rpm_limit: _Optional[int] = ..., tpm_limit: _Optional[int] = ..., key_id: _Optional[str] = ..., token_id: _Optional[str] = ..., expires_at: _Optional[float] = ..., issued_at: _Optional[float] = ..., session_id: _Optional[str] = ...) -> None: ...

class WatchRevocationsRequest(_message.Message):
    __slots__ = ("subscriber", "ack")
    SUBSCRIBER_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    subscriber: str
    ack: int
    def __init__(self, subscriber: _Optional[str] = ..., ack: _Optional[int] = ...) -> None: ...

class RevocationEvent(_message.Message):
    __slots__ = ("type", "kind", "value", "expires_at", "revoked_at", "seq")
    class Type(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        REVOCATION: _ClassVar[RevocationEvent.Type]
        SYNCED: _ClassVar[RevocationEvent.Type]
        HEARTBEAT: _ClassVar[RevocationEvent.Type]
        KEYS_ROTATED: _ClassVar[RevocationEvent.Type]
    REVOCATION: RevocationEvent.Type
    SYNCED: RevocationEvent.Type
    HEARTBEAT: RevocationEvent.Type
    KEYS_ROTATED: RevocationEvent.Type
    TYPE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    REVOKED_AT_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    type: RevocationEvent.Type
    kind: str
    value: str
    expires_at: float
    revoked_at: float
    seq: int
    def __init__(self, type: _Optional[_Union[RevocationEvent.Type, str]] = ..., kind: _Optional[str] = ..., value: _Optional[str] = ..., expires_at: _Optional[float] = ..., revoked_at: _Optional[float] = ..., seq: _Optional[int] = ...) -> None: ...

class GetJwksRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Jwks(_message.Message):
    __slots__ = ("json",)
    JSON_FIELD_NUMBER: _ClassVar[int]
    json: str
    def __init__(self, json: _Optional[str] = ...) -> None: ...
