from django.contrib import admin

from .models import Order
from .services import order_ship


@admin.register(Order)
class OrderAdmin(admin.ModelAdmin):
    list_display = ["__str__", "customer", "status", "created_at"]
    actions = ["ship"]

    @admin.action(description="Ship selected orders (notifies each customer)")
    def ship(self, request, queryset):
        for order in queryset.select_related("customer"):
            order_ship(order=order)
        self.message_user(request, "Shipped; customers notified.")
