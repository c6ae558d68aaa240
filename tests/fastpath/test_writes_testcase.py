"""Cached writes inside ``AsyncTestCase``: the test's connection, query counting and logging."""

from __future__ import annotations

from django_async_db import clear_compiled_sql_cache, compiled_sql_cache_info
from django_async_db.test import AsyncTestCase
from tests.testapp.models import Author


class CachedWritesInTestCaseTests(AsyncTestCase):
    @classmethod
    def setUpTestData(cls):
        cls.ann = Author.objects.create(name="Ann")

    def setUp(self):
        clear_compiled_sql_cache()

    async def test_hits_are_counted_and_logged(self):
        Author.objects.filter(name="Ann")  # learn the filter() shape: later ones are deferred
        async with self.assertNumQueries(9) as captured:
            for i in range(3):
                created = await Author.objects.acreate(name=f"new {i}")
                created.bio = "x"
                await created.asave()
                assert await Author.objects.filter(name="Ann").aupdate(bio=f"{i}") == 1
        assert compiled_sql_cache_info()[:2] == (6, 3)
        sqls = [q["sql"] for q in captured.captured_queries]
        assert sqls[0].startswith('INSERT INTO "testapp_author"')
        assert sqls[3] == sqls[0].replace("'new 0'", "'new 1'")
        assert sqls[5] == sqls[2].replace("'0'", "'1'")
        assert (await Author.objects.aget(pk=self.ann.pk)).bio == "2"
