"""Web Push (RFC 8030, VAPID RFC 8292, aes128gcm RFC 8291) through pywebpush. (Being built.)"""

from .models import Delivery


def send_pushes(rows: list[Delivery], token: str) -> None:
    raise NotImplementedError("Web Push delivery is being built")
