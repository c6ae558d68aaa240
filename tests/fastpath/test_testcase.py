"""Cache hits inside ``AsyncTestCase``: the test's connection, query counting and logging."""

from __future__ import annotations

from django.db import connections
from django.test.utils import CaptureQueriesContext

from django_async_db import clear_compiled_sql_cache, compiled_sql_cache_info, run_sync
from django_async_db.test import AsyncTestCase
from tests.testapp.models import Author


class CachedAgetInTestCaseTests(AsyncTestCase):
    @classmethod
    def setUpTestData(cls):
        cls.ann = Author.objects.create(name="Ann")
        cls.bob = Author.objects.create(name="Bob")

    def setUp(self):
        clear_compiled_sql_cache()

    async def test_hits_see_set_up_test_data_and_are_counted(self):
        async with self.assertNumQueries(3) as captured:
            for author in (self.ann, self.bob, self.ann):
                assert (await Author.objects.aget(pk=author.pk)).name == author.name
        assert compiled_sql_cache_info().hits == 2
        # Logged like Django's own queries: same SQL text, parameters inlined.
        sqls = [q["sql"] for q in captured.captured_queries]
        assert len(set(sqls)) == 2
        assert all(f'"id" = {self.ann.pk} LIMIT 21' in sql for sql in sqls[::2])

    async def test_debug_cursor_logs_hits(self):
        expected = await self._logged(lambda: Author.objects.get(pk=self.bob.pk))
        await Author.objects.aget(pk=self.ann.pk)  # fills the cache
        logged = await self._logged(None)
        assert compiled_sql_cache_info().hits == 1
        assert logged == expected

    async def _logged(self, sync_call):
        def capture():
            context = CaptureQueriesContext(connections["default"])
            context.__enter__()
            return context

        context = await run_sync(capture)
        try:
            if sync_call is None:
                await Author.objects.aget(pk=self.bob.pk)
            else:
                await run_sync(sync_call)
        finally:
            context.__exit__(None, None, None)
        return [q["sql"] for q in context.captured_queries]
