"""``import kvcache`` stays light: checked in a fresh interpreter (click's own habit)."""

import subprocess
import sys

CHECK = """
import sys
import kvcache
import kvcache.errors as e
for name in kvcache.__all__:
    getattr(kvcache, name)
assert sorted(kvcache.__all__) == kvcache.__all__
for name in e.__all__:
    assert issubclass(getattr(e, name), (e.KvCacheError, e.KvCacheWarning)), name
print("\\n".join(sys.modules))
"""


def test_import_kvcache_does_not_import_click():
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    mods = set(out.stdout.split())
    assert "kvcache" in mods and "kvcache.dataset" in mods
    assert not {m for m in mods if m == "click" or m.startswith("click.")}
    assert "kvcache.cli" not in mods


def test_every_warning_is_a_kvcache_warning():
    import kvcache

    assert issubclass(kvcache.KvCacheWarning, RuntimeWarning)
    assert "KvCacheWarning" in kvcache.__all__
