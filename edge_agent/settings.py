"""The one typed settings object: a TOML file per observatory, every key overridable by env.

    EDGE_AGENT_STATE_DIR=/srv/edge            -> state_dir
    EDGE_AGENT_STATUS__PORT=9000              -> status.port
    EDGE_AGENT_RULES__MAGIC__COPIES=3         -> rules.magic.copies

Invalid settings raise ConfigError whose message names each key, its value and why.
"""

from __future__ import annotations

import datetime as dt
import enum
import os
import re
import shutil
import tomllib
import zoneinfo
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, SecretStr, ValidationError,
                      field_validator, model_validator)
from pydantic_settings import (BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict,
                               TomlConfigSettingsSource)

from .core import policy, schedule
from .errors import ConfigError

ENV_PREFIX = "EDGE_AGENT_"
_KEY_RE = re.compile(r"^[a-z0-9][a-z0-9_\-]{0,62}$")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Completion(str, enum.Enum):
    """How the agent knows a DAQ file is finished. A rule's policies must all agree (AND)."""
    CLOSED = "closed"      # the writer closed it (inotify close-after-write; no writer holds it open)
    RENAMED = "renamed"    # it has its final name: names with temp_suffixes are never candidates
    STABLE = "stable"      # size and mtime unchanged for stable_seconds
    MARKER = "marker"      # FILE<marker_suffix> exists (e.g. run42.fits.done)
    SIDECAR = "sidecar"    # FILE<sidecar_suffix> exists and is a JSON object: it becomes metadata


class DeletePolicy(str, enum.Enum):
    """When a confirmed file is deleted from the buffer."""
    AFTER_CONFIRM = "after_confirm"
    KEEP = "keep"          # keep keep_hours after confirmation, then delete
    NEVER = "never"


class SiteSettings(_Section):
    """Where the instrument is: for rules whose data are expected at night (expected.night)."""
    latitude: float = Field(ge=-90, le=90, description="degrees, north positive")
    longitude: float = Field(ge=-180, le=180, description="degrees, east positive")
    elevation_m: float = Field(0.0, ge=-500, le=9000)


class ExpectedSettings(_Section):
    """When the rule's DAQ writes, for the schedule's alarms (core/schedule.py): hours of the day
    in the rule's time zone, or the night at the site."""
    hours: list[str] = Field([], description='spans of local time, e.g. ["20:00-06:00"] (may cross midnight)')
    night: Literal["civil", "nautical", "astronomical"] | None = Field(
        None, description="from the end of that twilight to its start (the sun below -6, -12 or -18 "
        "degrees at [site]); needs pip install 'edge-agent[schedule]' (astral)")
    quiet_minutes: float = Field(30.0, gt=0, description="alarm: no new file for this long while data are expected")
    min_files_per_hour: float = Field(0.0, ge=0, description="alarm: fewer new files in the last hour while "
                                      "data are expected (0: off)")

    @field_validator("hours")
    @classmethod
    def _hours(cls, v: list[str]) -> list[str]:
        for h in v:
            _span(h)
        return v

    @model_validator(mode="after")
    def _one_way(self) -> "ExpectedSettings":
        if bool(self.hours) == (self.night is not None):
            raise ValueError("give hours or night (one of them)")
        if self.night is not None:
            try:
                import astral  # noqa: F401
            except ImportError:
                raise ValueError("night needs astral: pip install 'edge-agent[schedule]'") from None
        return self

    def spec(self, site: "SiteSettings | None") -> schedule.Expected:
        return schedule.Expected(
            spans=tuple(_span(h) for h in self.hours), night=self.night,
            site=schedule.Site(site.latitude, site.longitude, site.elevation_m) if site else None,
            quiet_minutes=self.quiet_minutes, min_files_per_hour=self.min_files_per_hour)


def _span(text: str) -> schedule.Span:
    """"HH:MM-HH:MM" as a Span; ValueError naming the form otherwise."""
    try:
        a, b = text.split("-")
        start, end = dt.time.fromisoformat(a.strip()), dt.time.fromisoformat(b.strip())
    except ValueError:
        raise ValueError(f"{text!r}: not a span of local time such as \"20:00-06:00\"") from None
    if start == end:
        raise ValueError(f"{text!r}: an empty span (start = end)")
    return schedule.Span(start, end)


class WindowSettings(_Section):
    """A daily period with its own bandwidth cap (e.g. lower while the telescope observes)."""
    start: dt.time
    end: dt.time
    bandwidth_mbps: float = Field(ge=0, description="MB/s during the window; 0 pauses transfers")


class RetrySettings(_Section):
    """The backoff between attempts of a step that failed with a retryable error."""
    base_seconds: float = Field(10.0, gt=0)
    max_seconds: float = Field(600.0, gt=0)
    jitter: float = Field(0.2, ge=0, le=1)


class StatusSettings(_Section):
    """The status server: where it listens and who may ask it."""
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(8787, ge=0, le=65535)
    allowed_hosts: list[str] = Field([], description="Host header names answered besides loopback and `host`")

    @field_validator("allowed_hosts")
    @classmethod
    def _host_names(cls, v: list[str]) -> list[str]:
        for h in v:
            if not h.strip() or any(c in h for c in "/ @?#"):
                raise ValueError(f"{h!r}: a host name or address (no scheme or path), or \"*\"")
        return [h.strip().lower().rstrip(".") for h in v]


class LedgerSettings(_Section):
    """Where the ledger lives: SQLite in state_dir (the default; no server), or a PostgreSQL
    database the site runs (`url`). The password is never part of the URL."""
    url: str | None = Field(None, description="postgresql://USER@HOST[:PORT]/DATABASE (libpq options such as "
                            "sslmode=verify-full may follow as ?key=value); none: SQLite in state_dir")
    password: SecretStr | None = Field(None, description="the database user's password; better in password_file "
                                       "or EDGE_AGENT_LEDGER__PASSWORD than in the config file")
    password_file: Path | None = Field(None, description="a file holding the password (its first line)")
    connect_timeout_seconds: float = Field(10.0, gt=0)
    agent_id: str | None = Field(None, description="this agent's name in a shared ledger (default with a url: "
                                 "HOST:STATE_DIR); files its steps work on are claimed under it")
    lease_seconds: float = Field(300.0, ge=30, description="how long a claim lasts unless renewed (it is "
                                 "renewed every third of it while the step runs); a dead agent's files are "
                                 "taken by the others after it")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        from .ledgerdb import url_problem
        if v in (None, ""):
            return None
        problem = url_problem(v)
        if problem:
            raise ValueError(problem)
        return v

    @model_validator(mode="after")
    def _one_password(self) -> "LedgerSettings":
        if self.password is not None and self.password_file is not None:
            raise ValueError("give password or password_file, not both")
        if self.url is None and (self.password is not None or self.password_file is not None):
            raise ValueError("a password is for a PostgreSQL ledger: set url too")
        if self.url is not None:
            try:
                import psycopg  # noqa: F401
            except ImportError:
                raise ValueError("a PostgreSQL ledger needs psycopg: pip install 'edge-agent[postgres]' "
                                 "(or the distribution's python3-psycopg)") from None
        return self

    def secret(self) -> str | None:
        """The password, read from password_file where one is named (ConfigError if unreadable)."""
        if self.password is not None:
            return self.password.get_secret_value()
        if self.password_file is None:
            return None
        try:
            lines = self.password_file.read_text().splitlines()
        except OSError as exc:
            raise ConfigError(f"ledger.password_file = {self.password_file}: cannot be read: {exc.strerror}") from None
        return lines[0] if lines else ""


class LogSettings(_Section):
    """How much is logged, and in which format."""
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


class RucioAuthSettings(_Section):
    """How the agent proves who it is to Rucio. Secrets are never logged or printed."""
    type: Literal["userpass", "x509", "oidc"] = "userpass"
    username: str | None = None
    password: SecretStr | None = None
    cert: Path | None = Field(None, description="x509: client certificate, or an RFC 3820 proxy holding the key too")
    key: Path | None = Field(None, description="x509: private key (omit when cert is a proxy)")
    token_file: Path | None = Field(None, description="oidc: a file holding a bearer token that an external "
                                    "tool (oidc-agent, htgettoken) keeps fresh; re-read before it expires")
    token_url: str | None = Field(None, description="oidc: the issuer's token endpoint, for client credentials")
    client_id: str | None = None
    client_secret: SecretStr | None = None
    scope: str = "openid profile"
    audience: str = "rucio"

    @model_validator(mode="after")
    def _complete(self) -> "RucioAuthSettings":
        if self.type == "userpass" and not (self.username and self.password):
            raise ValueError("userpass needs username and password")
        if self.type == "x509" and not self.cert:
            raise ValueError("x509 needs cert (a certificate with key, or a proxy)")
        if self.type == "oidc" and not (self.token_file or (self.token_url and self.client_id
                                                            and self.client_secret)):
            raise ValueError("oidc needs token_file, or token_url + client_id + client_secret")
        return self


class RucioSettings(_Section):
    """The Rucio server, the account the agent uses, and how it talks to it."""
    url: str = Field(description="Rucio server, e.g. https://rucio.example.org")
    auth_url: str | None = Field(None, description="authentication server if not url")
    account: str
    vo: str | None = None
    auth: RucioAuthSettings
    ca_cert: Path | None = Field(None, description="CA bundle or directory for TLS; default: the system's")
    tls_verify: bool = Field(True, description="verify TLS certificates (never turn off in production)")
    timeout_seconds: float = Field(60.0, gt=0)
    schemes: list[str] = Field(["davs", "https", "root", "http"],
                               description="protocols the agent may upload with, in order of preference")
    root_client: Literal["auto", "bindings", "xrdcp"] = Field(
        "auto", description="how root:// is spoken, for uploads and reads: bindings (the XRootD Python "
        "bindings, the xroot extra; refused at start if they do not import), xrdcp (the xrdcp/xrdfs "
        "commands, a process per operation) or auto (the bindings where they import, else xrdcp)")
    verify_upload: Literal["adler32", "size"] = Field(
        "adler32", description="what the storage must confirm after an upload: adler32 (Want-Digest or "
        "checksum query; a storage that cannot answer fails the upload) or size only")
    verify_replicas: bool = Field(True, description="at confirmation, also ask each replica's storage for "
                                  "its adler32, not only the catalogue")
    stuck_after_hours: float = Field(24.0, gt=0, description="a rule still not OK this long after the "
                                     "upload is reported as stuck")
    batch_size: int = Field(200, ge=1, le=480)

    @field_validator("url", "auth_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^https?://[^/\s]+", v):
            raise ValueError("must be an http:// or https:// URL")
        return v.rstrip("/") if v else v


class LakeSettings(_Section):
    """Which catalogue the agent registers files in (the local lake or Rucio), and its knobs."""
    kind: Literal["local", "rucio"] = "local"
    catalog: Path | None = Field(None, description="local lake catalogue (SQLite); default STATE_DIR/lake-catalog.sqlite")
    name_pattern: str | None = Field(None, description="regular expression DID names must match; default: "
                                     "path-like names for the local lake, Rucio's generic schema for rucio")
    stuck_after_hours: float = Field(24.0, gt=0, description="local lake: copies still not all confirmed this "
                                     "long after they were written are reported (Rucio: lake.rucio.stuck_after_hours)")
    rucio: RucioSettings | None = None

    @field_validator("name_pattern")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            re.compile(v)
        except re.error as exc:
            raise ValueError(f"not a regular expression: {exc}") from None
        return v

    @model_validator(mode="after")
    def _kind(self) -> "LakeSettings":
        if self.kind == "rucio" and self.rucio is None:
            raise ValueError("kind = 'rucio' needs a [lake.rucio] table")
        return self

    @property
    def effective_name_pattern(self) -> str:
        if self.name_pattern:
            return self.name_pattern
        return policy.RUCIO_GENERIC_NAME_RE if self.kind == "rucio" else policy.PATH_NAME_RE


class DestinationSettings(_Section):
    """Where the agent writes copies itself.

    posix: a directory (a local disk or a mounted lake filesystem), local lake only.
    rse:   a Rucio storage element; the upload URL comes from Rucio (lfns2pfns) for the first
           of lake.rucio.schemes the RSE offers, unless `scheme` names one.
    """
    kind: Literal["posix", "rse"] = "posix"
    path: Path | None = None
    rse: str | None = None
    scheme: str | None = None
    verify: Literal["reread", "recorded"] = Field(
        "reread", description="posix: reread makes confirmation read the copy again; recorded trusts the "
        "adler32 stored with the copy while its size and mtime are unchanged")
    fsync: bool = True
    require_file: str | None = Field(None, description="posix: a file that must exist under path before "
                                     "anything is written there, e.g. '.lake-mounted': guards against "
                                     "filling an unmounted mount point")
    sign_url: Literal["s3"] | None = Field(
        None, description="rse: 's3' for an S3 RSE (Rucio attribute sign_url=s3): every read, write and "
        "delete goes through a URL Rucio signs; a copy counts when its size and ETag (= MD5) match")
    ca_cert: Path | None = Field(None, description="sign_url: CA file or directory that verifies the S3 "
                                 "gateway's TLS certificate; default: the system's CAs (never unverified)")
    signed_url_lifetime_seconds: int = Field(600, ge=5, le=7 * 86400, description="sign_url: how long each "
                                             "signed URL is valid; an expired one is signed again once")
    isolate_requests: bool = Field(True, description="rse: per storage server, every request but an upload "
                                   "(HEAD, DELETE, MKCOL, a checksum query) runs alone, never beside an upload "
                                   "or another request, as XRootD 5.5.3 needs; false: everything overlaps")
    puts_per_server: int | None = Field(None, ge=0, le=64, description="rse, with isolate_requests: uploads to "
                                        "one storage server side by side (0: any number); not set: 1 over "
                                        "HTTP/WebDAV, any number over root://")

    @field_validator("path")
    @classmethod
    def _absolute(cls, v: Path | None) -> Path | None:
        if v is not None and not v.is_absolute():
            raise ValueError("must be an absolute path")
        return v

    @model_validator(mode="after")
    def _kind(self) -> "DestinationSettings":
        if self.kind == "posix" and self.path is None:
            raise ValueError("a posix destination needs path")
        if self.kind == "rse" and not self.rse:
            raise ValueError("an rse destination needs rse (the RSE name)")
        if self.sign_url and self.kind != "rse":
            raise ValueError("sign_url is for rse destinations (S3 RSEs whose URLs Rucio signs)")
        if self.ca_cert is not None and not self.sign_url:
            raise ValueError("ca_cert is used only with sign_url = 's3' (other storage: lake.rucio.ca_cert)")
        return self


class ExtractorSettings(_Section):
    """A rule's metadata extractor, run in the hashing step: a command or a Python plug-in (one of
    them). Its JSON object is merged into each file's DID metadata (edge_agent/extractors)."""
    command: list[str] | None = Field(None, description="a program and its arguments, the file's path "
                                      "appended: run without a shell, it prints one JSON object on stdout")
    entry_point: str | None = Field(None, description="a plug-in's name in the entry point group "
                                    "edge_agent.extractors, loaded when the settings are")
    timeout_seconds: float = Field(60.0, gt=0, le=3600, description="command: killed (with everything it "
                                   "started) after this long, a failure")
    env: dict[str, str] = Field({}, description="command: variables added to its minimal environment "
                                "(PATH, LANG)")
    on_failure: Literal["quarantine", "skip"] = Field(
        "quarantine", description="quarantine: the file is not sent, the reason carries the extractor's "
        "stderr; skip: sent without the extractor's keys, with a warning")

    _plugin: Any = PrivateAttr(None)

    @field_validator("command")
    @classmethod
    def _command(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        if not v or not v[0]:
            raise ValueError("a program and its arguments, e.g. [\"/usr/local/bin/daq-meta\", \"--json\"]")
        from .extractors.command import BASE_ENV
        program = v[0] if "/" in v[0] else shutil.which(v[0], path=BASE_ENV["PATH"])
        if program is None:
            raise ValueError(f"{v[0]!r} is not in {BASE_ENV['PATH']} (the extractor's PATH): give its absolute path")
        if not os.path.isabs(program):
            raise ValueError("give the program's absolute path (it runs from /)")
        if not (os.path.isfile(program) and os.access(program, os.X_OK)):
            raise ValueError(f"{program} is not an executable file")
        return [program, *v[1:]]

    @field_validator("entry_point")
    @classmethod
    def _entry_point(cls, v: str | None) -> str | None:
        # resolved now, so that a name nobody installed stops the start, named by its key
        if v is not None:
            from .extractors.plugins import resolve
            resolve(v)
        return v

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, str]) -> dict[str, str]:
        for k in v:
            if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", k):
                raise ValueError(f"{k!r} is not an environment variable name")
        return v

    @model_validator(mode="after")
    def _one(self) -> ExtractorSettings:
        if (self.command is None) == (self.entry_point is None):
            raise ValueError("give command or entry_point (one of them)")
        if self.entry_point is not None:
            wrong = sorted({"timeout_seconds", "env"} & self.model_fields_set)
            if wrong:
                raise ValueError(f"{', '.join(wrong)}: only for a command (a plug-in runs inside the agent, "
                                 "where it cannot be timed out or given an environment)")
            from .extractors.plugins import resolve
            self._plugin = resolve(self.entry_point)     # found and loaded by _entry_point already
        return self

    @property
    def plugin(self) -> Any:
        """The loaded plug-in (extractors.plugins.Plugin) of an entry_point, else None."""
        return self._plugin


class RuleSettings(_Section):
    """One watched DAQ directory and what becomes of its files."""
    directory: Path
    include: list[str] = ["*"]
    exclude: list[str] = []
    recursive: bool = True
    completion: list[Completion] = [Completion.CLOSED, Completion.STABLE]
    stable_seconds: float = Field(5.0, ge=0)
    temp_suffixes: list[str] = [".tmp", ".part", ".writing", ".partial", ".filepart"]
    marker_suffix: str = ".done"
    sidecar_suffix: str = ".json"
    delete_markers: bool = Field(True, description="remove the marker/sidecar once the data file is deleted")
    scope: str
    name_template: str = "{relpath}"
    dataset_template: str | None = Field("{rule}.{night}", description="one dataset per night by default; "
                                         "\"\" for none")
    night_rollover_hour: int = Field(12, ge=0, le=23)
    timezone: str = "UTC"
    expected: ExpectedSettings | None = Field(None, description="when data are expected: the schedule's alarms")
    metadata: dict[str, str] = {}
    copies: int = Field(2, ge=1, le=16)
    destinations: list[str] = Field([], description="where the agent writes copies itself (rucio push: "
                                    "the first RSE, or several where the lake does not replicate)")
    # -- rucio only
    inject: Literal["push", "register"] = Field(
        "push", description="push: upload to destinations, then a rule for copies; register: the buffer "
        "is itself an RSE (buffer_rse), the replica is registered where it lies")
    rse_expression: str | None = Field(None, description="the replication rule's RSE expression; "
                                       "default: the destinations' RSEs joined by '|'")
    rule_lifetime_seconds: int | None = Field(None, gt=0)
    activity: str | None = None
    grouping: Literal["DATASET", "ALL", "NONE"] = "DATASET"
    rule_per: Literal["batch", "file"] = Field(
        "batch", description="batch: one replication rule for the files recorded together, on a closed "
        "dataset of exactly those files (`<dataset>.rule-<digest>`); file: one rule per file DID. Register "
        "mode with uplink_once asks per file (two rules each)")
    container_template: str | None = Field(None, description="a container the dataset is attached to")
    buffer_rse: str | None = Field(None, description="register: the RSE serving the buffer")
    buffer_url: str | None = Field(None, description="register: the URL of `directory` on buffer_rse, "
                                   "e.g. root://daq.example.org:1094//data/buffer/")
    uplink_once: bool = Field(True, description="register: the lake makes one copy from the buffer and the "
                              "rest from that copy (two rules), so each byte leaves the site once; false: one "
                              "rule of `copies`, each copy pulled from the buffer")
    delete: DeletePolicy = DeletePolicy.AFTER_CONFIRM
    keep_hours: float = Field(0.0, ge=0)
    recheck_before_delete: bool = Field(False, description="read the file once more right before deleting "
                                        "it, and keep it unless its blake3 is still the one recorded")
    receipts: Literal["none", "beside", "directory"] = Field(
        "none", description="a custody receipt per file (JSON: DID, checksums, replicas, when confirmed), "
        "written durably once the lake holds its N verified replicas, before the local file may go: beside "
        "the file as NAME.receipt, or under receipts_directory")
    receipts_directory: Path | None = Field(None, description="receipts = 'directory': where the receipts go, "
                                            "the file's subdirectories kept (outside every watched tree)")
    priority: int = Field(0, description="higher goes first when work competes")
    allow_empty: bool = Field(False, description="zero-byte files are quarantined unless true")
    md5: bool = False
    fits: Literal["auto", "off"] = Field("auto", description="auto: files named *.fits, *.fit, *.fts, *.fits.fz "
                                         "have their headers read and CHECKSUM/DATASUM verified in the hashing pass")
    fits_keywords: list[str] = Field(["OBJECT", "DATE-OBS", "MJD-OBS", "EXPTIME", "TELESCOP", "INSTRUME",
                                      "FILTER", "OBSERVER", "RA", "DEC"],
                                     description="primary-header keywords that become the file's metadata")
    fits_verify: bool = Field(True, description="quarantine a FITS file whose CHECKSUM/DATASUM do not verify "
                              "or that is truncated (corrupt at the source: never sent)")
    close_nights: bool = Field(False, description="close each night's dataset once the night plus "
                               "night_grace_hours has passed and every file of it is accounted for, with a "
                               "manifest and a verdict (needs {night} in dataset_template)")
    night_grace_hours: float = Field(2.0, ge=0, description="close_nights: wait this long after the rollover")
    night_deadline_hours: float = Field(12.0, ge=0, description="close_nights: a night not closed this long "
                                        "after its rollover is overdue (edge_agent_nights_overdue)")
    watermark_warn_percent: float = Field(80.0, gt=0, le=100)
    watermark_critical_percent: float = Field(90.0, gt=0, le=100)
    forecast_warn_hours: float = Field(6.0, ge=0, description="warn when the buffer is forecast full sooner")
    extractor: ExtractorSettings | None = Field(None, description="a program or plug-in whose JSON object "
                                                "adds to each file's metadata")

    @field_validator("directory", "receipts_directory")
    @classmethod
    def _absolute(cls, v: Path | None) -> Path | None:
        if v is not None and not v.is_absolute():
            raise ValueError("must be an absolute path")
        return v

    @field_validator("dataset_template", "container_template", mode="before")
    @classmethod
    def _empty_is_none(cls, v: object) -> object:
        return None if v == "" else v   # TOML has no null: "" says "no dataset"

    @field_validator("name_template", "dataset_template", "container_template")
    @classmethod
    def _template(cls, v: str | None) -> str | None:
        if v is not None:
            policy.check_template(v)
        return v

    @field_validator("scope")
    @classmethod
    def _scope(cls, v: str) -> str:
        if not policy.SCOPE_RE.match(v):
            raise ValueError("a scope is 1-25 characters of letters, digits, '_', '-', '.'")
        return v

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        try:
            zoneinfo.ZoneInfo(v)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError("unknown time zone (use an IANA name such as UTC or Atlantic/Canary)") from None
        return v

    @field_validator("completion")
    @classmethod
    def _completion(cls, v: list[Completion]) -> list[Completion]:
        if not v:
            raise ValueError("at least one completion policy is needed")
        return list(dict.fromkeys(v))

    @model_validator(mode="after")
    def _watermarks(self) -> "RuleSettings":
        if self.watermark_warn_percent > self.watermark_critical_percent:
            raise ValueError("watermark_warn_percent must not exceed watermark_critical_percent")
        if self.inject == "register" and not (self.buffer_rse and self.buffer_url):
            raise ValueError("inject = 'register' needs buffer_rse and buffer_url")
        if self.container_template and not self.dataset_template:
            raise ValueError("container_template needs dataset_template (a container holds datasets)")
        if self.close_nights and "night" not in policy.template_fields(self.dataset_template or ""):
            raise ValueError("close_nights needs {night} in dataset_template (a night is a dataset)")
        if self.close_nights and self.inject == "register":
            raise ValueError("close_nights works with inject = 'push' only for now (the manifest is uploaded "
                             "to the rule's destinations)")
        if self.close_nights and self.night_deadline_hours < self.night_grace_hours:
            raise ValueError("night_deadline_hours must not be shorter than night_grace_hours")
        return self

    @model_validator(mode="after")
    def _receipts(self) -> RuleSettings:
        if self.receipts == "directory" and self.receipts_directory is None:
            raise ValueError("receipts = 'directory' needs receipts_directory")
        if self.receipts != "directory" and self.receipts_directory is not None:
            raise ValueError(f"receipts_directory is used only with receipts = 'directory' (receipts is "
                             f"{self.receipts!r})")
        return self

    @property
    def tz(self) -> dt.tzinfo:
        return zoneinfo.ZoneInfo(self.timezone)


class Settings(BaseSettings):
    """Everything the agent can be told. See conf/edge-agent.example.toml."""
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter="__",
                                      extra="forbid", case_sensitive=False)

    toml_path: ClassVar[Path | None] = None

    state_dir: Path = Path("/var/lib/edge-agent")
    dry_run: bool = Field(False, description="do everything but delete local files")
    rescan_seconds: float = Field(60.0, gt=0, description="full rescan period; catches missed events")
    nights_check_seconds: float = Field(300.0, gt=0, description="how often nights are looked at for closing "
                                        "(rules with close_nights)")
    ledger_synchronous: Literal["full", "normal"] = Field(
        "full", description="full: every ledger commit is fsync'd (survives power loss); normal: survives "
        "kill -9, may repeat the last idempotent steps after a power loss; faster for many small files")
    tick_seconds: float = Field(0.5, gt=0, description="how often due work is looked for")
    hash_workers: int = Field(2, ge=1, le=64)
    transfer_workers: int = Field(4, ge=1, le=64)
    lake_workers: int = Field(3, ge=1, le=64, description="workers for catalogue calls: register, confirm, delete")
    lake_batch_files: int = Field(200, ge=1, le=1000, description="files a catalogue step (register, confirm, "
                                  "delete) takes at once, of one rule and dataset: one bulk call and one "
                                  "commit for them all")
    chunk_mb: int = Field(8, ge=1, le=256)
    bandwidth_mbps: float = Field(0.0, ge=0, description="transfer cap in MB/s; 0 = none (with a shared "
                                  "ledger: the fleet's cap, shared)")
    host_bandwidth_mbps: float = Field(0.0, ge=0, description="this agent's own transfer cap in MB/s (what its "
                                       "NIC or its part of a link allows), on top of its share of "
                                       "bandwidth_mbps: the lower wins; 0 = none")
    windows: list[WindowSettings] = []
    site: SiteSettings | None = Field(None, description="the instrument's coordinates (rules.*.expected.night)")
    stale_temp_seconds: float = Field(600.0, gt=0, description="a temporary or hidden name unchanged this "
                                      "long is reported in /status (a DAQ writer that died?)")
    confirm_interval_seconds: float = Field(30.0, gt=0, description="re-check of unconfirmed copies")
    retry: RetrySettings = RetrySettings()
    status: StatusSettings = StatusSettings()
    log: LogSettings = LogSettings()
    ledger: LedgerSettings = LedgerSettings()
    lake: LakeSettings = LakeSettings()
    destinations: dict[str, DestinationSettings] = {}
    rules: dict[str, RuleSettings] = {}

    @field_validator("state_dir")
    @classmethod
    def _absolute(cls, v: Path) -> Path:
        return v.absolute()

    @field_validator("destinations", "rules")
    @classmethod
    def _keys(cls, v: dict[str, Any]) -> dict[str, Any]:
        for k in v:
            if not _KEY_RE.match(k):
                raise ValueError(f"name {k!r}: use lower-case letters, digits, '_' and '-' "
                                 "(names are matched case-insensitively in environment variables)")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "Settings":
        if not self.rules:
            raise ValueError("no [rules.NAME] table: nothing to watch")
        problems: list[str] = []
        for name, rule in self.rules.items():
            for d in rule.destinations:
                if d not in self.destinations:
                    problems.append(f"rules.{name}.destinations: {d!r} is not a [destinations.*] table "
                                    f"(known: {sorted(self.destinations)})")
                elif self.destinations[d].kind != ("posix" if self.lake.kind == "local" else "rse"):
                    problems.append(f"rules.{name}.destinations: {d!r} is a {self.destinations[d].kind} "
                                    f"destination, which a {self.lake.kind} lake cannot use")
            s3 = [d for d in rule.destinations if d in self.destinations and self.destinations[d].sign_url]
            if s3 and not rule.md5:
                problems.append(f"rules.{name}.md5 = false: destination {s3[0]!r} is S3, where a copy is "
                                "verified by its ETag (the MD5 of its bytes); set md5 = true")
            if self.lake.kind == "local":
                if not rule.destinations:
                    problems.append(f"rules.{name}.destinations: the local lake needs at least one")
                elif rule.copies > len(set(rule.destinations)):
                    problems.append(f"rules.{name}.copies = {rule.copies}: the local lake makes one copy per "
                                    f"destination and the rule has {len(set(rule.destinations))}")
                if rule.inject != "push":
                    problems.append(f"rules.{name}.inject = {rule.inject!r}: only a rucio lake can register in place")
            elif rule.inject == "push" and not rule.destinations:
                problems.append(f"rules.{name}.destinations: push needs at least one RSE to upload to")
            elif rule.inject == "push" and not rule.rse_expression and rule.copies > len(set(rule.destinations)):
                problems.append(f"rules.{name}.copies = {rule.copies}: more than the destinations the agent "
                                "uploads to; set rse_expression to let the lake replicate")
            elif rule.inject == "register" and not rule.rse_expression:
                problems.append(f"rules.{name}.rse_expression: register needs the RSE expression of the "
                                "replication rule (e.g. 'lake=true')")
            for dname, dest in self.destinations.items():
                if dest.path is not None and _overlaps(rule.directory, dest.path):
                    problems.append(f"destinations.{dname}.path = {dest.path}: overlaps rules.{name}.directory "
                                    f"{rule.directory}; the agent would upload its own copies")
            if _overlaps(rule.directory, self.state_dir):
                problems.append(f"state_dir = {self.state_dir}: overlaps rules.{name}.directory")
            problems += self._receipts_place(name, rule)
        names = list(self.rules.items())
        for i, (a, ra) in enumerate(names):
            for b, rb in names[i + 1:]:
                if _overlaps(ra.directory, rb.directory):
                    problems.append(f"rules.{b}.directory = {rb.directory}: overlaps rules.{a}.directory "
                                    f"{ra.directory}; a file must belong to one rule")
        problems += self._distinct_destinations()
        problems += self._storage_gates()
        problems += self._shared_buffer()
        problems += [f"rules.{name}.expected.night: needs [site] (latitude, longitude)"
                     for name, rule in self.rules.items()
                     if rule.expected is not None and rule.expected.night is not None and self.site is None]
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _receipts_place(self, name: str, rule: RuleSettings) -> list[str]:
        """A receipts directory inside a watched tree would have its receipts taken for data (and
        receipts of them written in turn); in a lake directory or the state directory they would mix
        with what the agent keeps there; two rules sharing one could write one name for two files."""
        r = rule.receipts_directory
        if r is None:
            return []
        problems = [f"rules.{name}.receipts_directory = {r}: overlaps rules.{other}.directory {o.directory}; the "
                    "receipts would be taken for data (receipts = 'beside' puts them in the watched tree, "
                    "named so that the watcher skips them)"
                    for other, o in self.rules.items() if _overlaps(r, o.directory)]
        problems += [f"rules.{name}.receipts_directory = {r}: overlaps destinations.{d}.path {dest.path}"
                     for d, dest in self.destinations.items() if dest.path is not None and _overlaps(r, dest.path)]
        if _overlaps(r, self.state_dir):
            problems.append(f"rules.{name}.receipts_directory = {r}: overlaps state_dir {self.state_dir}")
        problems += [f"rules.{name}.receipts_directory = {r}: overlaps rules.{other}.receipts_directory "
                     f"{o.receipts_directory}; a receipt name must belong to one rule"
                     for other, o in self.rules.items() if other < name and o.receipts_directory is not None
                     and _overlaps(r, o.receipts_directory)]
        return problems

    def _shared_buffer(self) -> list[str]:
        """A shared ledger means a buffer shared with agents on other hosts, whose writers inotify
        and /proc do not see: `closed` would take a file another host still writes for complete, and
        the default (closed and stable) would quietly become `stable` alone, whose few seconds a
        pausing writer outlasts. So `closed` is refused, and the policy must be chosen explicitly."""
        if self.agent_id is None:
            return []
        problems: list[str] = []
        for name, rule in self.rules.items():
            if "completion" not in rule.model_fields_set:
                problems.append(
                    f"rules.{name}.completion: with a shared ledger (ledger.url or ledger.agent_id) choose how "
                    "a file is known complete: 'renamed', 'marker' or 'sidecar' where the DAQ can, else 'stable' "
                    "with a stable_seconds longer than a writer's longest pause ('closed', the default's half, "
                    "sees only writers on this host)")
            elif Completion.CLOSED in rule.completion:
                problems.append(
                    f"rules.{name}.completion: 'closed' cannot be used with a shared ledger (ledger.url or "
                    "ledger.agent_id): it sees only writers on this host, and the buffer is shared with "
                    "agents on others; use 'stable' (with a stable_seconds longer than a writer's longest "
                    "pause), 'marker', 'sidecar' or 'renamed'")
        return problems

    def _distinct_destinations(self) -> list[str]:
        """Copies are counted per destination, so two destinations must be two places: one file on
        disk reached by two names (the same path, a symlink, one inside the other) would count twice."""
        problems: list[str] = []
        for dname, dest in self.destinations.items():
            if dest.path is not None and _overlaps(dest.path, self.state_dir):
                problems.append(f"destinations.{dname}.path = {dest.path}: overlaps state_dir {self.state_dir}; "
                                "the ledger and the copies must not share a place")
        dests = list(self.destinations.items())
        for i, (a, da) in enumerate(dests):
            for b, db in dests[i + 1:]:
                if da.path is not None and db.path is not None and _overlaps(da.path, db.path):
                    problems.append(f"destinations.{b}.path = {db.path}: the same place as, or overlapping, "
                                    f"destinations.{a}.path {da.path}; one file there would count as two copies")
                if da.rse and db.rse and da.rse.upper() == db.rse.upper():
                    problems.append(f"destinations.{b}.rse = {db.rse!r}: the same RSE as destinations.{a}.rse; "
                                    "one replica there would count as two copies")
        return problems

    def _storage_gates(self) -> list[str]:
        """isolate_requests and puts_per_server shape the requests to an HTTP/WebDAV or root://
        server: a key set where it cannot act is refused rather than silently ignored."""
        problems: list[str] = []
        for dname, dest in self.destinations.items():
            given = [k for k in ("isolate_requests", "puts_per_server") if k in dest.model_fields_set]
            for key in given:
                if dest.kind != "rse":
                    problems.append(f"destinations.{dname}.{key}: only for rse destinations (storage servers "
                                    "reached over HTTP/WebDAV or root://); a posix destination has none")
                elif dest.sign_url:
                    problems.append(f"destinations.{dname}.{key}: not for an S3 destination (sign_url), "
                                    "whose requests never wait for each other")
            if dest.kind == "rse" and not dest.sign_url and not dest.isolate_requests \
                    and dest.puts_per_server is not None:
                problems.append(f"destinations.{dname}.puts_per_server = {dest.puts_per_server}: limits uploads "
                                "only with isolate_requests = true; with false nothing waits (remove one of them)")
        return problems

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings],
                                   init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_file = getattr(settings_cls, "toml_path", None)
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        return tuple(sources)

    # -- derived paths
    @property
    def ledger_path(self) -> Path:
        return self.state_dir / "ledger.sqlite"

    @property
    def ledger_target(self) -> str | Path:
        """What Ledger() opens: the PostgreSQL URL, or the SQLite file in state_dir."""
        return self.ledger.url or self.ledger_path

    @property
    def agent_id(self) -> str | None:
        """The name this agent claims files under (a ledger on PostgreSQL, or one named), else None."""
        if self.ledger.agent_id:
            return self.ledger.agent_id
        if self.ledger.url:
            import socket
            return f"{socket.gethostname()}:{self.state_dir}"
        return None

    @property
    def ledger_shown(self) -> str:
        """Where the ledger is, as it may be printed."""
        return self.ledger.url or str(self.ledger_path)

    @property
    def lake_catalog_path(self) -> Path:
        return self.lake.catalog or self.state_dir / "lake-catalog.sqlite"

    def windows_policy(self) -> list[policy.Window]:
        return [policy.Window(w.start, w.end, w.bandwidth_mbps) for w in self.windows]


def _overlaps(a: Path, b: Path) -> bool:
    """One path is the other or lies inside it, symlinks resolved (as far as the paths exist): a
    destination reached through a symlink into the watched tree is still inside it."""
    a, b = Path(os.path.realpath(a)), Path(os.path.realpath(b))
    return a == b or a in b.parents or b in a.parents


def load_settings(path: str | os.PathLike[str] | None, **overrides: Any) -> Settings:
    """Read the TOML file (if any), apply EDGE_AGENT_* variables, validate. Raises ConfigError."""
    toml_file: Path | None = None
    if path is not None:
        toml_file = Path(path)
        if not toml_file.is_file():
            raise ConfigError(f"config file {toml_file}: not found or not a regular file")
        try:
            with toml_file.open("rb") as fh:
                tomllib.load(fh)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {toml_file}: not valid TOML: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"config file {toml_file}: cannot be read: {exc.strerror}") from None
    cls = type("FileSettings", (Settings,), {"toml_path": toml_file})
    try:
        return cls(**overrides)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, toml_file)) from None


def format_validation_error(exc: ValidationError, source: Path | None) -> str:
    where = f"config file {source}" if source else "settings"
    lines = [f"{where}: {exc.error_count()} problem(s):"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key (a typo?)")
        elif err["type"] == "missing":
            lines.append(f"  {key}: required but missing")
        elif key == "(top level)":
            lines.append(f"  {msg}")
        else:
            lines.append(f"  {key} = {_show(err.get('input'))}: {msg}")
    return "\n".join(lines)


def _show(value: Any) -> str:
    from .ledgerdb import is_url, shown
    from .logs import is_secret_key, mask_text
    if isinstance(value, dict):        # a whole section refused: its secrets never shown
        value = {k: ("***" if is_secret_key(str(k)) and v else shown(v) if is_url(v) else v) for k, v in value.items()}
    elif is_url(value):
        value = shown(value)
    text = mask_text(repr(value))     # a refused URL may carry the very password it is refused for
    return text if len(text) <= 80 else text[:77] + "..."


def masked_dump(settings: Settings) -> dict[str, Any]:
    """The effective settings as plain data, secrets replaced by '***'."""
    def walk(v: Any) -> Any:
        if isinstance(v, SecretStr):
            return "***" if v.get_secret_value() else ""
        if isinstance(v, BaseModel):
            return {k: walk(getattr(v, k)) for k in type(v).model_fields}
        if isinstance(v, dict):
            # a free-form table (an extractor's env, a rule's metadata): a value under a key that
            # names a secret (DAQ_DB_PASSWORD, API_TOKEN...) is masked too
            return {k: ("***" if is_secret_key(str(k)) and isinstance(x, str) and x else walk(x)) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [walk(x) for x in v]
        if isinstance(v, enum.Enum):
            return v.value
        if isinstance(v, (Path, dt.time)):
            return str(v)
        return v
    from .logs import is_secret_key
    return walk(settings)
