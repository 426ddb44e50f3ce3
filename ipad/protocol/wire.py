"""The wire protocol, sans I/O: packets and file descriptors in, messages or ProtocolError out.

Like h11, this module does no networking and imports no trio: the daemon, the
worker host and the client library each wrap it in their own I/O. Every
message is one SOCK_SEQPACKET packet: a fixed 20-byte header, then a msgpack
payload encoded by msgspec (docs/protocol.md says why msgspec), with up to
MAX_FDS file descriptors passed alongside with SCM_RIGHTS.

Header, little-endian:

    magic    2s   b"IP"
    version  u8   PROTOCOL_VERSION
    type     u8   MsgType
    flags    u16  reserved, must be 0
    nfds     u16  file descriptors that came with the packet
    id       u64  request id; a reply carries its request's id, 0 = no reply expected
    length   u32  payload bytes that follow

Within the major version (the header's ``version``) messages only ever gain
optional fields, so every receiver ignores fields it does not know: an older
peer keeps working with a newer one. The fork server's messages are the
exception (docs/protocol.md, "Compatibility and versions").

Received descriptors belong to the receiver: ``decode`` closes them on any
error, and a Frame's owner hands them on or closes them (``Frame.close_fds``).
"""

from __future__ import annotations

import contextlib
import enum
import os
import struct
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import msgspec

MAGIC = b"IP"
#: The major version, the header's ``version`` byte: peers of different majors cannot talk.
PROTOCOL_VERSION = 1
#: The minor revision of this major that this side speaks; each revision only adds optional
#: fields (and message types a peer must first learn the other side knows, from the minor).
#: 0: the revision before minors were negotiated. 1: unknown fields ignored, ``minor``
#: in HELLO/WELCOME and LOAD/READY. 2: module descriptions (MethodSpec ``params``,
#: ``result``, ``doc``; ``types``; DESCRIBE/DESCRIPTION) and registered buffers
#: (MAP_BUFFERS ... BUFFERS_UNMAPPED, CALL ``buffer_args``). 3: operators' and module
#: authors' additions (PROXY_CAUSE, MODULE_LOG, LOGS, EVENT ``time`` among them).
PROTOCOL_MINOR = 3
#: The minor that brought DESCRIBE: a client sends it only to a daemon that agreed to it.
MINOR_DESCRIBE = 2
#: The minor that brought MAP_BUFFERS and CALL's ``buffer_args``, on a proxy's channel.
MINOR_REGISTERED_BUFFERS = 2
#: The minor that brought PROXY_CAUSE: a client asks it only of a daemon that agreed to it.
MINOR_PROXY_CAUSE = 3
#: The minor that brought MODULE_LOG: a worker sends it only to a daemon whose LOAD agreed to it.
MINOR_MODULE_LOG = 3
#: The minor that brought EVENT's ``time`` and LOGS/LOG_RECORDS (``ipadctl events``, ``logs``).
MINOR_CTL_LOGS = 3
#: The minor that brought ADMIN ``stop``/``start`` of one module: a daemon before it took
#: ``stop`` with a module for a stop of the daemon itself.
MINOR_MODULE_STOP = 3
HEADER = struct.Struct("<2sBBHHQI")
HEADER_SIZE = HEADER.size

#: Descriptors one message may carry; SCM_RIGHTS allows 253, a call needs a handful.
MAX_FDS = 16
#: Buffers one module instance may have registered at once (MAP_BUFFERS).
MAX_REGISTERED_BUFFERS = 64
#: Registered buffer ids are a C ``unsigned int``, as libcamera's.
MAX_BUFFER_ID = 2**32 - 1
#: Payload bytes one message may carry; bulk data goes in memfds, not in messages.
MAX_PAYLOAD = 256 * 1024
#: The receive buffer that holds any valid packet; a larger one is seen by MSG_TRUNC.
MAX_PACKET = HEADER_SIZE + MAX_PAYLOAD
#: Request ids are u64; 0 means "no reply expected".
MAX_REQUEST_ID = 2**64 - 1


class MsgType(enum.IntEnum):
    """Every message type; the number is the header's type byte."""

    # client <-> daemon
    HELLO = 1
    WELCOME = 2
    REQUEST_PROXY = 3
    PROXY_GRANTED = 4
    RELEASE_PROXY = 5
    RELEASED = 6
    SUBSCRIBE = 7
    SUBSCRIBED = 8
    EVENT = 9
    STATUS = 10
    STATUS_REPLY = 11
    LIST_MODULES = 12
    MODULES = 13
    GOODBYE = 14
    ADMIN = 16
    ADMIN_DONE = 17
    REOPEN_PROXY = 18
    PROXY_READY = 19
    PROXY_STATE = 20
    DESCRIBE = 21
    DESCRIPTION = 22
    PROXY_CAUSE = 25
    PROXY_CAUSE_REPLY = 26
    LOGS = 23
    LOG_RECORDS = 24
    # any direction: the typed error reply
    ERROR = 15
    # daemon <-> worker (the control channel)
    LOAD = 32
    READY = 33
    OPEN_INSTANCE = 34
    INSTANCE_OPENED = 35
    PING = 36
    PONG = 37
    SHUTDOWN = 38
    CLOSE_INSTANCE = 39
    INSTANCE_CLOSED = 40
    HEARTBEAT = 41
    MODULE_LOG = 42
    # daemon <-> fork server
    SPAWN = 56
    SPAWNED = 57
    PRELOAD = 58
    # client <-> worker (a proxy's channel)
    CALL = 48
    RESULT = 49
    MODULE_EVENT = 50
    MAP_BUFFERS = 51
    BUFFERS_MAPPED = 52
    UNMAP_BUFFERS = 53
    BUFFERS_UNMAPPED = 54


class Message(msgspec.Struct, frozen=True):
    """Base of all messages; ``TYPE`` is the header's type. Unknown fields are ignored."""

    TYPE: ClassVar[MsgType]


# --- client <-> daemon -------------------------------------------------------


class Hello(Message, frozen=True):
    """First message of a client; ``versions`` are the protocol versions it speaks."""

    TYPE = MsgType.HELLO
    versions: tuple[int, ...]
    client: str = ""
    #: The highest minor revision of the chosen major the client speaks (absent: 0).
    minor: int = 0


class Welcome(Message, frozen=True):
    """The daemon accepts a client and says which version they will speak."""

    TYPE = MsgType.WELCOME
    version: int
    daemon_version: str
    pid: int
    #: The minor both speak from now on: the lower of HELLO's and the daemon's (absent: 0).
    minor: int = 0


class RequestProxy(Message, frozen=True):
    """Ask for a proxy to a module, optionally for a pipeline handler at a version."""

    TYPE = MsgType.REQUEST_PROXY
    module: str
    pipeline: str | None = None
    pipeline_version: int | None = None


class ParamSpec(msgspec.Struct, frozen=True):
    """One parameter of a described method: its JSON Schema, default, and whether a Buffer."""

    name: str
    #: JSON Schema of the annotated type; ``{}`` is anything (and every Buffer's).
    schema: dict[str, Any] = msgspec.field(default_factory=dict)
    required: bool = True
    #: The default a call without it gets (meaningful when not ``required``).
    default: Any = None
    #: Passed as a file descriptor (``fd_args``), never in ``args``.
    buffer: bool = False


class MethodSpec(msgspec.Struct, frozen=True):
    """A module method as the worker announced it: replayed after a restart if ``setup``."""

    name: str
    setup: bool = False
    #: The setup method a call to this one cancels (``stop`` undoes ``start``).
    undoes: str | None = None
    #: Its parameters, in order (None: not described, by an older worker or a dropped one).
    params: tuple[ParamSpec, ...] | None = None
    #: JSON Schema of its result (None: not described).
    result: dict[str, Any] | None = None
    #: Its docstring.
    doc: str = ""


class ProxyGranted(Message, frozen=True):
    """A proxy; its channel to the worker instance comes as the one passed fd."""

    TYPE = MsgType.PROXY_GRANTED
    proxy_id: int
    module: str
    module_version: str
    worker_pid: int
    methods: tuple[MethodSpec, ...]
    state: str
    seq: int
    #: The module whose worker serves the proxy, when a fallback stands in for ``module``.
    served_by: str = ""
    #: Seconds: the serving module's ``call_timeout``, every call's default deadline
    #: (0: none given, as from a daemon before it).
    call_timeout: float = 0.0
    #: The minor the serving worker agreed in READY: the channel speaks the lower of it
    #: and the client's own (absent: 0).
    minor: int = 0
    #: The named types (JSON Schema ``$defs``) the methods' schemas refer to.
    types: dict[str, Any] = msgspec.field(default_factory=dict)


class ReleaseProxy(Message, frozen=True):
    """The client is done with a proxy; its instance is freed."""

    TYPE = MsgType.RELEASE_PROXY
    proxy_id: int


class Released(Message, frozen=True):
    """Reply to ReleaseProxy."""

    TYPE = MsgType.RELEASED
    proxy_id: int


class Subscribe(Message, frozen=True):
    """Ask for events from now on; with ``since``, first those after it the daemon still has."""

    TYPE = MsgType.SUBSCRIBE
    since: int | None = None


class Subscribed(Message, frozen=True):
    """Reply to Subscribe; ``replayed`` past events follow it, then new ones after ``seq``."""

    TYPE = MsgType.SUBSCRIBED
    seq: int
    replayed: int = 0


class Event(Message, frozen=True):
    """Something changed; ``seq`` increases by one for every event the daemon makes."""

    TYPE = MsgType.EVENT
    seq: int
    kind: str
    module: str
    proxy_id: int | None = None
    state: str | None = None
    reason: str | None = None
    worker_pid: int | None = None
    details: dict[str, Any] = msgspec.field(default_factory=dict)
    #: When the daemon made it: wall-clock seconds since the epoch (absent from older daemons).
    time: float | None = None


class Status(Message, frozen=True):
    """Ask for the daemon's and every module's state."""

    TYPE = MsgType.STATUS


class StatusReply(Message, frozen=True):
    """The daemon's state; ``modules`` maps a module name to its state fields."""

    TYPE = MsgType.STATUS_REPLY
    daemon: dict[str, Any]
    modules: dict[str, dict[str, Any]]


class ListModules(Message, frozen=True):
    """Ask for the discovered modules and their manifests."""

    TYPE = MsgType.LIST_MODULES


class Modules(Message, frozen=True):
    """Reply to ListModules."""

    TYPE = MsgType.MODULES
    modules: dict[str, dict[str, Any]]


class Admin(Message, frozen=True):
    """An operator's command: ``restart``, ``stop`` or ``start`` a module, ``reload``, ``stop``."""

    TYPE = MsgType.ADMIN
    command: str
    module: str | None = None


class AdminDone(Message, frozen=True):
    """Reply to Admin: what was done."""

    TYPE = MsgType.ADMIN_DONE
    result: dict[str, Any]


class ReopenProxy(Message, frozen=True):
    """After its worker was restarted, a new channel for an invalid proxy (reply: PROXY_GRANTED)."""

    TYPE = MsgType.REOPEN_PROXY
    proxy_id: int


class ProxyReady(Message, frozen=True):
    """The client replayed a reopened proxy's setup calls: it is valid again."""

    TYPE = MsgType.PROXY_READY
    proxy_id: int
    replayed: int = 0


class ProxyStateReply(Message, frozen=True):
    """Reply to ProxyReady: the proxy's state and the event that announced it."""

    TYPE = MsgType.PROXY_STATE
    proxy_id: int
    state: str
    seq: int


class Logs(Message, frozen=True):
    """Ask for the daemon's recent log records from its ring (``ipadctl logs``); admin only."""

    TYPE = MsgType.LOGS
    #: Only records whose ``module`` field is this one.
    module: str | None = None
    #: At most this many records; without ``after``, the last ones (a reply may hold fewer).
    lines: int = 10
    #: Records after this cursor (a LOG_RECORDS ``cursor``), oldest first.
    after: int | None = None


class LogRecords(Message, frozen=True):
    """Reply to Logs: records oldest first, where the next LOGS goes on, where the journal is."""

    TYPE = MsgType.LOG_RECORDS
    records: tuple[dict[str, Any], ...]
    #: The ``after`` of the next LOGS: the last record's ``seq``, else the ring's newest.
    cursor: int
    #: More matching records follow the cursor already (the reply was full).
    more: bool = False
    #: The daemon's records go to journald: ``journalctl`` with ``journal_match`` has them all.
    journal: bool = False
    journal_match: tuple[str, ...] = ()


class Describe(Message, frozen=True):
    """Ask for a module's description (its methods' parameters, results, docs) without a proxy."""

    TYPE = MsgType.DESCRIBE
    module: str


class Description(Message, frozen=True):
    """Reply to Describe: what the module's last ready worker announced, bounded by the daemon."""

    TYPE = MsgType.DESCRIPTION
    module: str
    version: str
    methods: tuple[MethodSpec, ...]
    #: The named types (JSON Schema ``$defs``) the methods' schemas refer to.
    types: dict[str, Any] = msgspec.field(default_factory=dict)
    #: Why the methods are not described ("" when they are, or why the daemon dropped it).
    note: str = ""


class ProxyCause(Message, frozen=True):
    """Why is the proxy not valid? Asked when a call's worker died (reply: PROXY_CAUSE_REPLY)."""

    TYPE = MsgType.PROXY_CAUSE
    proxy_id: int
    #: The worker whose end the client saw (its grant's ``worker_pid``); 0: the proxy's own.
    worker_pid: int = 0


class ProxyCauseReply(Message, frozen=True):
    """Reply to ProxyCause: the proxy's state and the reason the daemon gave it ("" if none)."""

    TYPE = MsgType.PROXY_CAUSE_REPLY
    proxy_id: int
    state: str
    reason: str = ""


class Goodbye(Message, frozen=True):
    """The sender closes the connection, and says why."""

    TYPE = MsgType.GOODBYE
    reason: str


class Error(Message, frozen=True):
    """A typed error reply: ``code`` is one of ErrorCode, for programs; ``message`` for people."""

    TYPE = MsgType.ERROR
    code: str
    message: str
    details: dict[str, Any] = msgspec.field(default_factory=dict)


class ErrorCode(enum.StrEnum):
    """Error codes; new ones may be added, so receivers treat unknown codes as errors too."""

    BAD_MESSAGE = "bad_message"
    UNSUPPORTED_VERSION = "unsupported_version"
    UNKNOWN_MODULE = "unknown_module"
    UNKNOWN_COMMAND = "unknown_command"
    INVALID_CONFIG = "invalid_config"
    UNKNOWN_PROXY = "unknown_proxy"
    UNKNOWN_METHOD = "unknown_method"
    BAD_ARGUMENTS = "bad_arguments"
    MODULE_ERROR = "module_error"
    MODULE_UNAVAILABLE = "module_unavailable"
    WORKER_CRASHED = "worker_crashed"
    PIPELINE_MISMATCH = "pipeline_mismatch"
    #: The configuration's [access] policy does not let this client do that.
    PERMISSION_DENIED = "permission_denied"
    #: One of the [clients] limits (proxies, requests in flight) would be exceeded.
    LIMIT_EXCEEDED = "limit_exceeded"
    #: The daemon is stopping: an admin operation was refused, or its wait cut short.
    STOPPING = "stopping"
    INTERNAL = "internal"


# --- daemon <-> worker -------------------------------------------------------


class Load(Message, frozen=True):
    """Tell a worker host which module to load, from where, with which tuning file."""

    TYPE = MsgType.LOAD
    module: str
    entry_point: str
    module_dir: str
    tuning: str
    #: Seconds between beats on the heartbeat board passed with LOAD (0: none passed).
    heartbeat_interval: float = 0.0
    #: Relative path -> SHA-256 of each file of the module's verified signature: the worker
    #: imports from ``module_dir`` only these files' bytes, checked (None: not signed).
    signed: dict[str, str] | None = None
    #: The highest minor revision the daemon speaks (absent: 0).
    minor: int = 0
    #: The daemon's log level: the worker sends no MODULE_LOG below it ("": every level).
    log_level: str = ""


class Ready(Message, frozen=True):
    """The worker loaded its module and serves."""

    TYPE = MsgType.READY
    module: str
    version: str
    methods: tuple[MethodSpec, ...]
    pid: int
    #: The worker beats on the board LOAD passed; False: it answers PING instead.
    beats: bool = False
    #: The minor both speak: the lower of LOAD's and the worker's (absent: 0).
    minor: int = 0
    #: The named types (JSON Schema ``$defs``) the methods' schemas refer to.
    types: dict[str, Any] = msgspec.field(default_factory=dict)


class OpenInstance(Message, frozen=True):
    """Create a module instance served on the passed channel fd."""

    TYPE = MsgType.OPEN_INSTANCE
    instance_id: int


class InstanceOpened(Message, frozen=True):
    """Reply to OpenInstance."""

    TYPE = MsgType.INSTANCE_OPENED
    instance_id: int


class Ping(Message, frozen=True):
    """Heartbeat request."""

    TYPE = MsgType.PING


class Pong(Message, frozen=True):
    """Heartbeat reply."""

    TYPE = MsgType.PONG


class Shutdown(Message, frozen=True):
    """Ask a worker to close its instances and exit."""

    TYPE = MsgType.SHUTDOWN


class CloseInstance(Message, frozen=True):
    """Free an instance (its proxy was released) and close its channel; no reply."""

    TYPE = MsgType.CLOSE_INSTANCE
    instance_id: int


class Heartbeat(Message, frozen=True):
    """Beat on the board every ``interval`` seconds from now on; no reply.

    A standby worker is loaded with a slow beat nobody watches; its promotion
    brings it to the module's heartbeat interval.
    """

    TYPE = MsgType.HEARTBEAT
    interval: float


class InstanceClosed(Message, frozen=True):
    """The worker closed an instance on its own (its channel ended or broke); no reply."""

    TYPE = MsgType.INSTANCE_CLOSED
    instance_id: int
    reason: str


class ModuleLog(Message, frozen=True):
    """A log record of the module (or an exception it raised), worker to daemon; no reply."""

    TYPE = MsgType.MODULE_LOG
    #: ``debug``, ``info``, ``warning``, ``error`` or ``critical`` (others are logged as info).
    level: str
    #: The module's event name, or its ``logging`` message.
    text: str
    #: The record's fields, scalars only (docs/protocol.md bounds them).
    fields: dict[str, str | int | float | bool | None] = msgspec.field(default_factory=dict)
    #: ``log``: a record the module wrote; ``exception``: a call that raised, by the host.
    kind: str = "log"
    #: The instance whose code wrote it (0: none, as at load).
    instance_id: int = 0
    #: The method in flight when it was written ("" outside a call).
    method: str = ""
    #: The ``logging`` logger's name ("" for ``context.log``).
    logger: str = ""
    #: A traceback (an exception report's, or one ``log.exception`` attached).
    traceback: str = ""
    #: Records the worker dropped before this one (its own rate limit).
    suppressed: int = 0


# --- daemon <-> fork server ----------------------------------------------------


class SandboxSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How one worker is confined; the worker side applies it before any module code runs.

    Strict, as every daemon <-> fork server message: both ends come from one
    install, and a confinement setting silently ignored would weaken the jail.

    Built by the daemon from the ``sandboxed`` kind's settings (ipad/config/sandbox_plan.py)
    and applied in the new process by ipad/worker/sandbox.py: forked ones get it in SPAWN,
    spawned ones on the command line of ``python -m ipad.worker.jail``.
    """

    module: str
    #: As root: the ids to switch to, supplementary groups dropped (None: keep ours).
    uid: int | None = None
    gid: int | None = None
    #: Unprivileged: a user namespace mapping only our own uid and gid.
    user_namespace: bool = False
    pid_namespace: bool = False
    #: A network namespace of its own: no interface but a loopback that is down.
    network: bool = False
    ipc: bool = False
    #: The read-only view: host paths bound at the same place (None: the host's tree).
    view: tuple[str, ...] | None = None
    #: Directories inside the view shown empty (other modules' tuning and module dirs).
    hidden: tuple[str, ...] = ()
    #: Size of the private, writable /tmp, in bytes.
    tmp_size: int = 0
    #: setrlimit resource name (``RLIMIT_AS``...) -> soft and hard limit; -1 is infinity.
    rlimits: dict[str, int] = msgspec.field(default_factory=dict)
    no_new_privs: bool = False
    oom_score_adj: int | None = None
    #: The memory limit in bytes (None: none), and a cgroup v1 directory to join for it.
    memory_max: int | None = None
    memory_cgroup: str | None = None
    seccomp: bool = False


class Spawn(Message, frozen=True, forbid_unknown_fields=True):
    """Fork a worker host serving the passed control socket, with this environment.

    The fds: the control socket, the write end of the pipe that becomes the
    worker's stdout and stderr, and with ``cgroup`` the directory of the cgroup
    to fork it into. With ``sandbox`` the new worker confines itself before it
    serves (ipad/worker/sandbox.py).
    """

    TYPE = MsgType.SPAWN
    env: dict[str, str]
    cgroup: bool = False
    sandbox: SandboxSpec | None = None


class Spawned(Message, frozen=True, forbid_unknown_fields=True):
    """Reply to Spawn: the new worker's pid (a child of the daemon, not of the fork server)."""

    TYPE = MsgType.SPAWNED
    pid: int
    #: Whether it was forked straight into the cgroup (else the daemon moves it).
    in_cgroup: bool = False


class Preload(Message, frozen=True, forbid_unknown_fields=True):
    """Import these trusted modules (``DIR:package.module``) before forking any worker; no reply.

    The daemon starts the fork server before it has read its configuration,
    and names what to preload once it has.
    """

    TYPE = MsgType.PRELOAD
    modules: tuple[str, ...]


# --- client <-> worker -------------------------------------------------------


class Call(Message, frozen=True):
    """Call a method; the passed fds go, in order, to the parameters named in ``fd_args``."""

    TYPE = MsgType.CALL
    method: str
    args: dict[str, Any] = msgspec.field(default_factory=dict)
    fd_args: tuple[str, ...] = ()
    #: Buffer parameter -> id of a buffer registered with MAP_BUFFERS (left out when empty).
    buffer_args: dict[str, int] | msgspec.UnsetType = msgspec.UNSET


class Result(Message, frozen=True):
    """A method's return value."""

    TYPE = MsgType.RESULT
    value: Any = None


class ModuleEvent(Message, frozen=True):
    """An event a module instance sent to its client."""

    TYPE = MsgType.MODULE_EVENT
    name: str
    data: Any = None


class BufferSpec(msgspec.Struct, frozen=True):
    """One buffer of MAP_BUFFERS: the client's id for it and how the module may use it."""

    id: int
    #: ``input`` (read-only memfd), ``output`` (writable memfd), ``dmabuf`` (read-only
    #: dma-buf), ``dmabuf_output`` (writable dma-buf).
    kind: str = "input"


class MapBuffers(Message, frozen=True):
    """Register buffers with the instance, kept mapped until unmapped; the fds in order."""

    TYPE = MsgType.MAP_BUFFERS
    buffers: tuple[BufferSpec, ...]


class BuffersMapped(Message, frozen=True):
    """Reply to MapBuffers: every buffer was registered (none is, on ERROR)."""

    TYPE = MsgType.BUFFERS_MAPPED
    ids: tuple[int, ...]


class UnmapBuffers(Message, frozen=True):
    """Unregister buffers: the worker unmaps them and closes its descriptors."""

    TYPE = MsgType.UNMAP_BUFFERS
    ids: tuple[int, ...]


class BuffersUnmapped(Message, frozen=True):
    """Reply to UnmapBuffers."""

    TYPE = MsgType.BUFFERS_UNMAPPED
    ids: tuple[int, ...]


MESSAGE_CLASSES: dict[MsgType, type[Message]] = {
    cls.TYPE: cls
    for cls in (
        Hello, Welcome, RequestProxy, ProxyGranted, ReleaseProxy, Released, Subscribe, Admin,
        AdminDone, ReopenProxy, ProxyReady, ProxyStateReply, Describe, Description, Logs,
        LogRecords,
        Subscribed, Event, Status, StatusReply, ListModules, Modules, Goodbye, Error, Load,
        Ready, OpenInstance, InstanceOpened, Ping, Pong, Shutdown, CloseInstance, InstanceClosed,
        Heartbeat, ModuleLog, Spawn, Spawned, Preload, Call, Result, ModuleEvent,
        MapBuffers, BuffersMapped, UnmapBuffers, BuffersUnmapped,
        ProxyCause, ProxyCauseReply,
    )
}  # fmt: skip

#: What each side may receive; anything else is a protocol error from that peer.
FROM_CLIENT = frozenset(
    {MsgType.HELLO, MsgType.REQUEST_PROXY, MsgType.RELEASE_PROXY, MsgType.SUBSCRIBE,
     MsgType.STATUS, MsgType.LIST_MODULES, MsgType.GOODBYE, MsgType.ADMIN,
     MsgType.REOPEN_PROXY, MsgType.PROXY_READY, MsgType.DESCRIBE, MsgType.PROXY_CAUSE,
     MsgType.LOGS}
)  # fmt: skip
FROM_DAEMON = frozenset(
    {MsgType.WELCOME, MsgType.PROXY_GRANTED, MsgType.RELEASED, MsgType.SUBSCRIBED,
     MsgType.EVENT, MsgType.STATUS_REPLY, MsgType.MODULES, MsgType.GOODBYE, MsgType.ERROR,
     MsgType.ADMIN_DONE, MsgType.PROXY_STATE, MsgType.DESCRIPTION, MsgType.PROXY_CAUSE_REPLY,
     MsgType.LOG_RECORDS}
)  # fmt: skip
TO_WORKER_CONTROL = frozenset(
    {MsgType.LOAD, MsgType.OPEN_INSTANCE, MsgType.CLOSE_INSTANCE, MsgType.PING, MsgType.SHUTDOWN,
     MsgType.HEARTBEAT}
)  # fmt: skip
FROM_WORKER_CONTROL = frozenset(
    {MsgType.READY, MsgType.INSTANCE_OPENED, MsgType.INSTANCE_CLOSED, MsgType.PONG, MsgType.ERROR,
     MsgType.MODULE_LOG}
)  # fmt: skip
TO_FORKSERVER = frozenset({MsgType.SPAWN, MsgType.PRELOAD, MsgType.SHUTDOWN})
FROM_FORKSERVER = frozenset({MsgType.SPAWNED, MsgType.ERROR})
TO_WORKER_CHANNEL = frozenset({MsgType.CALL, MsgType.MAP_BUFFERS, MsgType.UNMAP_BUFFERS})
FROM_WORKER_CHANNEL = frozenset(
    {MsgType.RESULT, MsgType.ERROR, MsgType.MODULE_EVENT, MsgType.BUFFERS_MAPPED,
     MsgType.BUFFERS_UNMAPPED}
)  # fmt: skip

#: Messages that may carry descriptors, and how many at most.
FD_LIMITS: dict[MsgType, int] = {
    MsgType.PROXY_GRANTED: 1,
    MsgType.LOAD: 1,
    MsgType.OPEN_INSTANCE: 1,
    MsgType.SPAWN: 3,
    MsgType.CALL: MAX_FDS,
    MsgType.MAP_BUFFERS: MAX_FDS,
}

_ENCODER = msgspec.msgpack.Encoder()
#: Header type byte -> MsgType: a dict lookup, cheaper on every packet than MsgType(kind).
_TYPES: dict[int, MsgType] = {kind.value: kind for kind in MsgType}
_DECODERS: dict[MsgType, msgspec.msgpack.Decoder[Any]] = {
    kind: msgspec.msgpack.Decoder(cls) for kind, cls in MESSAGE_CLASSES.items()
}


def agreed_minor(theirs: int) -> int:
    """The minor revision two peers speak: the lower of both (a peer's nonsense clamped to 0)."""
    return max(0, min(theirs, PROTOCOL_MINOR))


class ProtocolError(Exception):
    """The peer sent something that breaks the protocol; ``reason`` says what, for the peer."""

    def __init__(self, reason: str, request_id: int = 0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.request_id = request_id


class Frame(msgspec.Struct, frozen=True):
    """A received message with its request id and the descriptors that came with it."""

    message: Message
    request_id: int = 0
    fds: tuple[int, ...] = ()

    def close_fds(self) -> None:
        """Close every descriptor; for a receiver that does not hand them on."""
        close_fds(self.fds)


def close_fds(fds: Sequence[int]) -> None:
    """Close descriptors, ignoring ones already closed."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def encode(message: Message, request_id: int = 0, nfds: int = 0) -> bytes:
    """One packet: header plus payload. ``nfds`` is how many fds the caller sends with it."""
    if not 0 <= nfds <= FD_LIMITS.get(message.TYPE, 0):
        raise ValueError(f"{message.TYPE.name} cannot carry {_fds(nfds)}")
    if not 0 <= request_id <= MAX_REQUEST_ID:
        raise ValueError(f"request id {request_id} is outside 0..2**64-1")
    payload = _ENCODER.encode(message)
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(
            f"{message.TYPE.name} payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}"
        )
    header = HEADER.pack(MAGIC, PROTOCOL_VERSION, message.TYPE, 0, nfds, request_id, len(payload))
    return header + payload


def decode(
    packet: bytes,
    fds: Sequence[int] = (),
    *,
    allowed: frozenset[MsgType] | None = None,
    max_payload: int = MAX_PAYLOAD,
    decoders: Mapping[MsgType, msgspec.msgpack.Decoder[Any]] | None = None,
) -> Frame:
    """Decode one packet; raise ProtocolError (closing ``fds``) for anything malformed.

    ``allowed`` is the set of types this receiver accepts from this peer;
    ``decoders`` replaces the decoder of some types (a client keeps module
    events undecoded until they are read: ipad/client/_backlog.py).
    """
    try:
        return _decode(bytes(packet), tuple(fds), allowed, max_payload, decoders)
    except BaseException:
        close_fds(fds)  # the fds were ours; nobody else will ever close them
        raise


def _decode(
    packet: bytes,
    fds: tuple[int, ...],
    allowed: frozenset[MsgType] | None,
    max_payload: int,
    decoders: Mapping[MsgType, msgspec.msgpack.Decoder[Any]] | None = None,
) -> Frame:
    if len(packet) < HEADER_SIZE:
        raise ProtocolError(f"packet of {len(packet)} bytes is shorter than the header")
    magic, version, kind, flags, nfds, request_id, length = HEADER.unpack_from(packet)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {magic!r}")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"unsupported protocol version {version}", request_id)
    msg_type = _TYPES.get(kind)
    if msg_type is None:
        raise ProtocolError(f"unknown message type {kind}", request_id)
    if allowed is not None and msg_type not in allowed:
        raise ProtocolError(f"unexpected message {msg_type.name}", request_id)
    if flags:
        raise ProtocolError(f"unknown flags {flags:#x}", request_id)
    if length != len(packet) - HEADER_SIZE:
        received = len(packet) - HEADER_SIZE
        raise ProtocolError(
            f"payload length {length} does not match the {received} bytes received", request_id
        )
    if length > max_payload:
        raise ProtocolError(f"payload of {length} bytes exceeds {max_payload}", request_id)
    if nfds != len(fds):
        raise ProtocolError(f"header announces {_fds(nfds)} but {len(fds)} arrived", request_id)
    if len(fds) > FD_LIMITS.get(msg_type, 0):
        raise ProtocolError(f"{msg_type.name} cannot carry {_fds(len(fds))}", request_id)
    try:
        decoder = _DECODERS[msg_type] if decoders is None else decoders.get(msg_type)
        message = (decoder or _DECODERS[msg_type]).decode(memoryview(packet)[HEADER_SIZE:])
    except (ValueError, RecursionError) as exc:
        # DecodeError and ValidationError are ValueErrors, and so is invalid UTF-8;
        # absurd nesting exhausts the recursion limit. All of it is the peer's fault.
        raise ProtocolError(f"bad {msg_type.name} payload: {exc}", request_id) from None
    return Frame(message, request_id, fds)


def _fds(count: int) -> str:
    return f"{count} file descriptor" + ("" if count == 1 else "s")
