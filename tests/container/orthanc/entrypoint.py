#!/usr/bin/python3
"""Start Debian's Orthanc configured from environment variables, like the orthancteam image.

ORTHANC__SOME_KEY=value       -> {"SomeKey": value}   (the value parsed as JSON when it is)
ORTHANC__DICOM_WEB__ROOT=x    -> {"DicomWeb": {"Root": x}}   (double underscore: nesting)
DICOM_WEB_PLUGIN_ENABLED=true -> load Debian's libOrthancDicomWeb.so
"""

import json
import os
import sys

PLUGINS = {"DICOM_WEB_PLUGIN_ENABLED": "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"}
CONFIG = "/tmp/orthanc.json"


def pascal(word: str) -> str:
    """``DICOM_WEB`` -> ``DicomWeb``."""
    return "".join(part.capitalize() for part in word.split("_") if part)


def value(text: str) -> object:
    """JSON when the text parses as JSON, else the text itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def config(environ: dict[str, str]) -> dict[str, object]:
    """The Orthanc configuration for these environment variables."""
    cfg: dict[str, object] = {
        "Name": "Orthanc",
        "StorageDirectory": "/var/lib/orthanc/db",
        "IndexDirectory": "/var/lib/orthanc/db",
        "HttpPort": 8042,
        "DicomPort": 4242,
        "RemoteAccessAllowed": True,
        "AuthenticationEnabled": True,
        "Plugins": [
            path for name, path in PLUGINS.items() if environ.get(name, "").lower() == "true"
        ],
    }
    for name, raw in sorted(environ.items()):
        if not name.startswith("ORTHANC__"):
            continue
        keys = [pascal(k) for k in name[len("ORTHANC__") :].split("__")]
        node = cfg
        for key in keys[:-1]:
            child = node.setdefault(key, {})
            assert isinstance(child, dict), name
            node = child
        node[keys[-1]] = value(raw)
    return cfg


def main() -> None:
    """Write the configuration (mode 0600: it holds the password) and exec Orthanc on it."""
    fd = os.open(CONFIG, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(config(dict(os.environ)), f, indent=2)
    os.execv("/usr/sbin/Orthanc", ["Orthanc", *sys.argv[1:], CONFIG])  # noqa: S606


if __name__ == "__main__":
    main()
