"""Changes to a running mosquitto's dynamic-security plugin (`$CONTROL/dynamic-security/v1`), torch-free.

The plugin reads its file only when mosquitto starts; a device provisioned while the broker runs is added
through the plugin's control topic, as the `pf-admin` client, and the plugin saves its file itself.
"""

from __future__ import annotations

import json
import threading
import uuid
from dataclasses import replace
from typing import Any

from cloud_sync.broker_files import DEVICE_ROLE, DYNSEC_ADMIN
from cloud_sync.client import Message, MqttClient
from cloud_sync.config import MqttConfig
from cloud_sync.errors import ConnectError

CONTROL = "$CONTROL/dynamic-security/v1"


def device_commands(username: str, password: str) -> list[dict[str, Any]]:
    """Replace the client `username` (a device) with one holding `password` and the pf-device role."""
    return [
        {"command": "deleteClient", "username": username},  # "not found" for a new device: ignored
        {"command": "createClient", "username": username, "password": password,
         "roles": [{"rolename": DEVICE_ROLE}]},
    ]


def delete_commands(username: str) -> list[dict[str, Any]]:
    return [{"command": "deleteClient", "username": username}]


def apply(mqtt: MqttConfig, admin_password: str, commands: list[dict[str, Any]], timeout_s: float = 10.0
          ) -> list[dict[str, Any]]:
    """Send `commands` to the broker as pf-admin; returns the plugin's responses. ConnectError when the broker
    cannot be reached or refuses a command (other than deleting a client that does not exist)."""
    cfg = replace(mqtt, client_id=DYNSEC_ADMIN, username=DYNSEC_ADMIN, password=admin_password, password_file="")
    client = MqttClient(cfg, client_id=DYNSEC_ADMIN, name=f"{DYNSEC_ADMIN}-{uuid.uuid4().hex[:6]}")
    done = threading.Event()
    responses: list[dict[str, Any]] = []

    def on_response(msg: Message) -> None:
        responses.extend(json.loads(msg.payload).get("responses", []))
        done.set()

    client.subscribe(f"{CONTROL}/response", on_response, qos=1)
    try:
        client.start().wait_connected(timeout_s)  # the SUBSCRIBE went out on connect, before this PUBLISH
        client.publish(CONTROL, json.dumps({"commands": commands}).encode(), qos=1)
        if not done.wait(timeout_s):
            raise ConnectError(f"the broker's dynamic-security plugin did not answer within {timeout_s:g}s")
    finally:
        client.stop()
    errors = [r for r in responses if r.get("error") and not (
        r.get("command") == "deleteClient" and "not found" in str(r.get("error")).lower())]
    if errors:
        raise ConnectError(f"dynamic-security refused {errors[0].get('command')}: {errors[0].get('error')}")
    return responses
