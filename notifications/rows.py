"""Model instances from rows of a written-out statement, as the ORM itself would build them.

For the few statements on the path of every handshake and API request (``notifications.auth``,
``selectors.store_heads``): building a query through the ORM costs more CPU than running it
(docs/performance.md: 3 ms against 0.4 ms for the token, its user and the followed topics).
The database's own converters are applied, so a SQLite row gives the same ``datetime`` and
``bool`` values as a PostgreSQL one, and the instance is the ORM's: ``Model.from_db``.
"""

import weakref
from collections.abc import Sequence

from django.db import connection as default_connection
from django.db import models


class Columns:
    """The concrete columns of ``model`` under the table alias ``alias`` in a statement."""

    def __init__(self, model: type[models.Model], alias: str):
        self.model = model
        self.fields = list(model._meta.concrete_fields)
        self.alias = alias
        quote = default_connection.ops.quote_name
        self.sql = ", ".join(f"{alias}.{quote(field.column)}" for field in self.fields)
        self.attnames = [field.attname for field in self.fields]
        self._converters: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __len__(self) -> int:
        return len(self.fields)

    def build(self, values: Sequence, connection) -> models.Model:
        """The instance for this model's part of a row (``values`` in the order of ``sql``)."""
        converters = self._converters.get(connection)
        if converters is None:
            converters = self._converters[connection] = self._converters_for(connection)
        converted = list(values)
        for index, expression, functions in converters:
            value = converted[index]
            for function in functions:
                value = function(value, expression, connection)
            converted[index] = value
        return self.model.from_db(connection.alias, self.attnames, converted)

    def _converters_for(self, connection) -> list:
        """What the ORM's compiler applies to each column (``SQLCompiler.get_converters``)."""
        out = []
        for index, field in enumerate(self.fields):
            expression = field.get_col(self.model._meta.db_table)
            functions = connection.ops.get_db_converters(expression) + expression.get_db_converters(connection)
            if functions:
                out.append((index, expression, functions))
        return out
