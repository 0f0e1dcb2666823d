"""The pattern for "when my model changes, notify users": the model's own service does
the write and calls ``notification_send`` inside the same transaction. The notification
is stored with the change and pushed only if the transaction commits.
(No signals: a signal would hide the side effect from the reader and fire on rollbacks' saves.)
"""

from django.db import transaction

from notifications.services import notification_send

from .models import Order


def order_place(*, customer, item: str) -> Order:
    with transaction.atomic():
        order = Order.objects.create(customer=customer, item=item)
        notification_send(
            users=[customer],
            title=f"Order #{order.pk} placed",
            body=f"We received your order for {item}.",
            data={"order_id": order.pk, "status": order.status},
            link=f"/orders/{order.pk}/",
        )
    return order


def order_ship(*, order: Order) -> Order:
    with transaction.atomic():
        order.status = Order.Status.SHIPPED
        order.save(update_fields=["status"])
        notification_send(
            users=[order.customer],
            title=f"Order #{order.pk} shipped",
            level="success",
            data={"order_id": order.pk, "status": order.status},
        )
    return order
