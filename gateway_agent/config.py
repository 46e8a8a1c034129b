"""Settings: defaults < TOML file < GATEWAY_* environment (nested ``__``) < command-line flags."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from ._exceptions import ConfigError

__all__ = [
    "DEFAULT_CONFIG_FILE",
    "DeidSettings",
    "DestinationSettings",
    "DiskSettings",
    "LogSettings",
    "MetricsSettings",
    "QCSettings",
    "Settings",
    "load_settings",
]

DEFAULT_CONFIG_FILE = Path("/etc/gateway-agent/config.toml")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class DeidSettings(_Section):
    """De-identification options: the ten PS3.15 Annex E options plus the pixel policy."""

    retain_safe_private: bool = False
    retain_uids: bool = False
    retain_device_identity: bool = False
    retain_institution_identity: bool = False
    retain_patient_characteristics: bool = False
    retain_long_full_dates: bool = False
    retain_long_modified_dates: bool = True
    clean_descriptors: bool = True
    clean_structured_content: bool = False
    clean_graphics: bool = False
    burned_in: Literal["quarantine", "allow"] = "quarantine"
    station_name: str | None = Field(
        default=None, max_length=16, description="StationName written into outputs (SH, ≤16)."
    )
    secret_file: Path | None = Field(
        default=None,
        description="Site secret (mode 0600, created on first use); default state/secret.key",
    )

    @model_validator(mode="after")
    def _dates(self) -> DeidSettings:
        if self.retain_long_full_dates and self.retain_long_modified_dates:
            # Full dates win; modified dates would shift what the user asked to keep.
            self.retain_long_modified_dates = False
        return self


class DestinationSettings(_Section):
    """Where de-identified instances go."""

    kind: Literal["folder", "dicomweb"] = "folder"
    folder: Path = Path("destination")
    url: str | None = Field(
        default=None, description="DICOMweb base, e.g. http://127.0.0.1:8042/dicom-web"
    )
    auth: Literal["none", "basic", "bearer"] = "none"
    username: str | None = None
    password: SecretStr | None = None
    password_file: Path | None = None
    token: SecretStr | None = None
    token_file: Path | None = None
    verify_tls: bool = True
    ca_bundle: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    timeout_seconds: float = Field(default=30.0, gt=0)
    batch_max_instances: int = Field(default=25, ge=1, le=1000)
    batch_max_mb: float = Field(default=16.0, gt=0)
    parallel_requests: int = Field(default=4, ge=1, le=32)
    max_attempts: int = Field(default=20, ge=1)
    max_age_hours: float = Field(default=72.0, gt=0)
    backoff_base_seconds: float = Field(default=1.0, gt=0)
    backoff_cap_seconds: float = Field(default=300.0, gt=0)
    confirm_storage: bool = Field(
        default=False, description="After a STOW 200, confirm each instance with QIDO."
    )

    @model_validator(mode="after")
    def _url(self) -> DestinationSettings:
        if self.kind == "dicomweb" and not self.url:
            raise ValueError('destination.url is required when destination.kind = "dicomweb"')
        if self.url and not self.url.startswith(("http://", "https://")):
            raise ValueError("destination.url must start with http:// or https://")
        return self

    @model_validator(mode="after")
    def _auth(self) -> DestinationSettings:
        for name in ("password", "token"):
            if getattr(self, name) is not None and getattr(self, f"{name}_file") is not None:
                raise ValueError(f"set destination.{name} or destination.{name}_file, not both")
        if self.auth == "basic" and not (self.username and (self.password or self.password_file)):
            raise ValueError(
                'destination.auth = "basic" needs destination.username and '
                "destination.password (or password_file)"
            )
        if self.auth == "bearer" and not (self.token or self.token_file):
            raise ValueError('destination.auth = "bearer" needs destination.token (or token_file)')
        return self


class QCSettings(_Section):
    """Periodic QC inside the agent."""

    enabled: bool = True
    interval_seconds: float = Field(default=300.0, gt=0)
    slices_per_series: int = Field(default=3, ge=1)
    n_clusters: int = Field(default=2, ge=1, le=20)
    max_cpu_fraction: float = Field(
        default=0.05,
        gt=0,
        le=1,
        description="CPU budget of one QC pass as a fraction of interval_seconds on one core; "
        "instances beyond it are passed over (counted as skipped_budget).",
    )


class MetricsSettings(_Section):
    """Prometheus metrics and health endpoints."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(default=9464, ge=0, le=65535)
    ready_upload_window_seconds: float = Field(
        default=900.0, gt=0, description="/readyz: an upload this recent means reachable."
    )
    ready_max_waiting: int = Field(
        default=10000, ge=0, description="/readyz: else ready while at most this many wait."
    )
    ready_max_waiting_age_seconds: float = Field(
        default=3600.0, gt=0, description="/readyz: ... and the oldest is younger than this."
    )


class DiskSettings(_Section):
    """Operating limits on the state folder."""

    min_free_mb: float = Field(default=500.0, ge=0)
    sent_retention_hours: float = Field(default=24.0, ge=0)
    audit_retention_days: float = Field(
        default=365.0, gt=0, description="Rows of sent instances are kept this long, then deleted."
    )
    check_interval_seconds: float = Field(
        default=10.0, gt=0, description="Disk guard re-check period while idle."
    )


class LogSettings(_Section):
    """Logging: JSON when not on a terminal, console on a terminal."""

    format: Literal["auto", "json", "console"] = "auto"
    level: Literal["debug", "info", "warning", "error"] = "info"


class Settings(BaseSettings):
    """Everything gateway-agent reads at start-up."""

    model_config = SettingsConfigDict(
        env_prefix="GATEWAY_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    inbox: Path = Path("inbox")
    state_dir: Path = Path("state")
    unit_name: str = Field(default="EDGE01", max_length=16)
    settle_seconds: float = Field(default=2.0, ge=0)
    originals: Literal["delete", "archive", "keep"] = "delete"
    archive_dir: Path | None = None
    intake_workers: int = Field(default_factory=lambda: max(1, os.cpu_count() or 1), ge=1)
    deid: DeidSettings = DeidSettings()
    destination: DestinationSettings = DestinationSettings()
    qc: QCSettings = QCSettings()
    metrics: MetricsSettings = MetricsSettings()
    disk: DiskSettings = DiskSettings()
    log: LogSettings = LogSettings()

    @model_validator(mode="after")
    def _archive(self) -> Settings:
        if self.originals == "archive" and self.archive_dir is None:
            raise ValueError('archive_dir is required when originals = "archive"')
        return self

    @property
    def secret_file(self) -> Path:
        return self.deid.secret_file or self.state_dir / "secret.key"

    @property
    def station_name(self) -> str:
        return self.deid.station_name or self.unit_name

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # init kwargs carry TOML merged with CLI flags (see load_settings); env sits between.
        return (_OverridesSource(settings_cls), env_settings, init_settings)


class _OverridesSource(PydanticBaseSettingsSource):
    """Command-line flags: the highest precedence, set through ``load_settings(overrides=...)``."""

    current: ClassVar[dict[str, Any]] = {}

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self.current.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self.current)


def _deep_set(target: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for part in parts[:-1]:
        target = target.setdefault(part, {})
    target[parts[-1]] = value


def read_toml(path: Path) -> dict[str, Any]:
    """Read a TOML config file; a missing or malformed file is a ConfigError."""
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


_SECRET_PARTS = ("password", "token", "secret", "key")


def _describe_error(err: Any, toml: dict[str, Any], flags: dict[str, Any]) -> str:
    """One line: which key, what was wrong (what is allowed), the value given and where from."""
    loc = [str(p) for p in err["loc"]]
    key = ".".join(loc) or "(settings)"
    msg = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        model: Any = Settings
        for part in loc[:-1]:
            model = getattr(model.model_fields.get(part), "annotation", None)
        allowed = ", ".join(getattr(model, "model_fields", {})) or "none"
        msg = f"unknown setting (allowed here: {allowed})"
    value = err.get("input")
    if isinstance(value, str | int | float | bool) and loc and err["type"] != "extra_forbidden":
        shown = "***" if any(s in loc[-1] for s in _SECRET_PARTS) else repr(value)[:60]
        msg += f" (got {shown})"

    def has(tree: dict[str, Any]) -> bool:
        for part in loc:
            if not isinstance(tree, dict) or part not in tree:
                return False
            tree = tree[part]
        return bool(loc)

    env = "GATEWAY_" + "__".join(loc).upper()
    if has(flags):
        msg += " [from the command line]"
    elif any(k.upper() == env for k in os.environ):
        msg += f" [from {env}]"
    elif has(toml):
        msg += " [from the config file]"
    return f"{key}: {msg}"


def load_settings(
    config_file: Path | None = None, overrides: dict[str, Any] | None = None
) -> Settings:
    """Build Settings from the layers; raise ConfigError with one line per problem.

    ``config_file`` None means ``/etc/gateway-agent/config.toml`` if it exists.
    ``overrides`` maps dotted keys (``"destination.url"``) to values from the command line.
    """
    toml: dict[str, Any] = {}
    if config_file is not None:
        toml = read_toml(config_file)
    elif DEFAULT_CONFIG_FILE.is_file():
        toml = read_toml(DEFAULT_CONFIG_FILE)
    flags: dict[str, Any] = {}
    for key, value in (overrides or {}).items():
        if value is not None:
            _deep_set(flags, key, value)
    _OverridesSource.current = flags
    try:
        return Settings(**toml)
    except ValidationError as exc:
        lines = [_describe_error(err, toml, flags) for err in exc.errors()]
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from None
    finally:
        _OverridesSource.current = {}
