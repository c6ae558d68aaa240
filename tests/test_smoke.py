import threading

import pytest

from django_async_db import async_connections
from tests.testapp.models import Author

pytestmark = pytest.mark.django_db(transaction=True)


async def test_cursor_roundtrip():
    async with async_connections["default"].cursor() as cur:
        await cur.execute("SELECT %s, %s", [1, "x"])
        assert await cur.fetchone() == (1, "x")


async def test_orm_native(thread_probe):
    a = await Author.objects.acreate(name="Ann")
    assert (await Author.objects.aget(pk=a.pk)).name == "Ann"
    assert thread_probe() == {threading.get_ident()}
