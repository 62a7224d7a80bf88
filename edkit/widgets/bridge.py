"""HoloViews plots inside ipywidgets layouts, with every resource inlined (no CDN).

The bridge is Panel's: a :class:`panel.pane.HoloViews` renders the HoloViews object to a Bokeh
model and keeps it subscribed to the object's streams; jupyter_bokeh's ``BokehModel`` ipywidget
shows that model and forwards every change of its Bokeh document to the browser. A stream's
``send`` therefore updates the plot in place (a ``ColumnDataSource`` patch), never by redrawing
the cell.

Workshops run offline, Binder sits behind proxies and CI has no network: :func:`extension`
loads BokehJS, HoloViews' and Panel's JavaScript *inline* (``hv.extension("bokeh",
inline=True)``, ``pn.extension(inline=True)``), and
:class:`HoloViewsWidget` renders its model with Panel's stylesheets inlined, so nothing a widget
needs is fetched from cdn.bokeh.org or cdn.holoviz.org.
"""

import threading
import weakref
from collections.abc import Callable
from typing import Any

import holoviews as hv
import panel as pn
from bokeh.document import Document
from bokeh.models import ColumnDataSource, ImportedStyleSheet, InlineStyleSheet
from bokeh.models.ui import UIElement
from jupyter_bokeh.widgets import BokehModel
from panel.io.resources import CDN_DIST, DIST_DIR, set_resource_mode

__all__ = ["HoloViewsWidget", "extension", "refinement_lock"]

_loaded = False
_locks: "weakref.WeakKeyDictionary[Any, threading.Lock]" = weakref.WeakKeyDictionary()
_locks_guard = threading.Lock()


def refinement_lock(refinement: Any) -> threading.Lock:
    """The lock every widget holds while it steps or reads ``refinement`` (one per refinement,
    shared by all widgets), so that no two threads call into it at once."""
    with _locks_guard:
        lock = _locks.get(refinement)
        if lock is None:
            lock = _locks[refinement] = threading.Lock()
        return lock


def extension(*, force: bool = False) -> None:
    """Load HoloViews' Bokeh backend and Panel with inline resources (idempotent).

    In a Jupyter kernel this publishes the loader once: BokehJS, HoloViews' and Panel's
    JavaScript inlined into the notebook (about 3.4 MB of output, no network access); plain
    HoloViews objects then display as Bokeh plots too. It makes Bokeh HoloViews' current
    backend. The widgets call it themselves; call it again with ``force=True`` after reloading
    the browser page of a running kernel. Outside Jupyter it only loads the plotting backend.
    """
    global _loaded
    if _loaded and not force:
        return
    # panel's _config.__setattr__ stores it; mypy sees only the read-only property
    pn.config.inline = True  # type: ignore[misc]
    # HoloViews first: its notebook hooks make plain HoloViews objects render as Bokeh plots;
    # Panel then adds its own models to the (already inline) BokehJS.
    hv.extension("bokeh", inline=True, logo=False)
    pn.extension(inline=True)
    _loaded = True


def _inline_css(stylesheet: Any, cache: dict[str, InlineStyleSheet]) -> Any:
    """Panel's CDN stylesheet ``stylesheet`` as an inline one read from Panel's own dist."""
    if not isinstance(stylesheet, ImportedStyleSheet) or not stylesheet.url.startswith(CDN_DIST):
        return stylesheet
    url = stylesheet.url.split("?")[0]
    if url not in cache:
        path = DIST_DIR / url[len(CDN_DIST) :]
        if not path.exists():
            return stylesheet
        cache[url] = InlineStyleSheet(css=path.read_text(encoding="utf-8"))
    return cache[url]


def inline_stylesheets(root: Any, doc: Document | None = None) -> None:
    """Replace Panel's CDN stylesheets in the Bokeh model tree ``root`` by inline copies.

    With Panel ≥ 1.9 the document is also registered so that later updates stay inline.
    """
    patch_inline_stylesheets: Callable[[Any, Document | None], Any] | None
    try:  # Panel's own helper registers ``doc`` for later updates
        from panel.io.notebook import patch_inline_stylesheets
    except ImportError:  # pragma: no cover - older Panel
        patch_inline_stylesheets = None
    cache: dict[str, InlineStyleSheet] = {}
    for model in root.select({"type": UIElement}):
        if patch_inline_stylesheets is not None:
            patch_inline_stylesheets(model, doc)
        sheets = [_inline_css(sheet, cache) for sheet in model.stylesheets]
        if sheets != list(model.stylesheets):
            model.stylesheets = sheets


class HoloViewsWidget(BokehModel):
    """An ipywidget showing a HoloViews object, updated in place by the object's streams.

    Args:
      obj: any HoloViews object (typically a ``DynamicMap`` or a layout of them).
      css_class: a CSS class added to the widget's DOM node (for browser tests and styling).

    Attributes:
      pane: the :class:`panel.pane.HoloViews` that renders ``obj`` and keeps it subscribed.
    """

    def __init__(self, obj: Any, *, css_class: str | None = None, **kwargs: Any) -> None:
        extension()
        pane = pn.pane.HoloViews(obj, backend="bokeh")
        doc = Document()
        with set_resource_mode("inline"):
            root = pane.get_root(doc=doc)
        inline_stylesheets(root, doc)
        super().__init__(root, combine_events=True, **kwargs)
        self.pane = pane
        if css_class:
            self.add_class(css_class)

    @property
    def bokeh_model(self) -> Any:
        """The root Bokeh model (a ``LayoutDOM``) shown by the widget."""
        return self._model

    def sources(self) -> list[ColumnDataSource]:
        """Every Bokeh ``ColumnDataSource`` of the rendered plot (what the browser draws)."""
        return list(self._model.select({"type": ColumnDataSource}))

    def source_with(self, column: str) -> ColumnDataSource:
        """The first ``ColumnDataSource`` that has a column named ``column``.

        Raises:
          KeyError: no source has it.
        """
        for source in self.sources():
            if column in source.data:
                return source
        raise KeyError(f"no ColumnDataSource of this plot has a column {column!r}")
