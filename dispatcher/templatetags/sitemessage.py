"""``{% load sitemessage %}``: django-sitemessage's template tags.

``{% sitemessage_prefs_table from user_prefs %}`` renders the subscription table of
``user_prefs``, the tuple ``get_user_preferences_for_ui()`` returned, with
``sitemessage/user_prefs_table.html``; ``template "sitemessage/user_prefs_table-bootstrap.html"``
(a string or a variable) picks another template. Put it inside your own ``<form method="post">``
with ``{% csrf_token %}`` and a submit button, and call ``set_user_preferences_from_request()``
in the view that receives it.

A table template gets ``sitemessage_user_prefs`` (the tuple as it is, django-sitemessage's
name) and ``sitemessage_prefs_rows``: ``(message title, cells)`` pairs, each cell a dict with
``messenger`` (the column's title), ``alias``, ``supported`` and ``subscribed``, so a
template can label every checkbox without indexing the header list.
"""

from __future__ import annotations

from typing import Any

from django import template
from django.conf import settings
from django.template import Engine
from django.template.base import FilterExpression, Parser, Token
from django.template.context import Context

from messengers.exceptions import SiteMessageConfigurationError

register = template.Library()

DEFAULT_TEMPLATE = "sitemessage/user_prefs_table.html"
NOTATION = (
    "`sitemessage_prefs_table` tag expects the following notation: "
    '{% sitemessage_prefs_table from user_prefs template "sitemessage/my_pref_table.html" %} '
    "(the template clause is optional)"
)


@register.tag
def sitemessage_prefs_table(parser: Parser, token: Token) -> PrefsTableNode:
    """Compiles the tag; a ``from`` clause is required, ``template`` optional, nothing else.

    Raises TemplateSyntaxError (naming the expected notation) for anything else."""
    tokens = token.split_contents()
    prefs = detect_clause(parser, "from", tokens)
    template_name = detect_clause(parser, "template", tokens)
    if prefs is None or len(tokens) != 1:  # no "from", or something besides the clauses
        raise template.TemplateSyntaxError(NOTATION)
    return PrefsTableNode(prefs, template_name)


def detect_clause(parser: Parser, clause_name: str, tokens: list[str]) -> FilterExpression | None:
    """Takes the clause ``<clause_name> <value>`` out of a tag's ``tokens`` (which it changes)
    and returns its value compiled; None when there is no such clause (django-sitemessage's
    helper). Raises TemplateSyntaxError (the notation) when the clause has no value."""
    if clause_name not in tokens:
        return None
    index = tokens.index(clause_name)
    if index + 1 == len(tokens):
        raise template.TemplateSyntaxError(NOTATION)
    value = parser.compile_filter(tokens[index + 1])
    del tokens[index : index + 2]
    return value


class PrefsTableNode(template.Node):
    """Renders the table template with the resolved preferences."""

    def __init__(self, prefs: FilterExpression, template_name: FilterExpression | None) -> None:
        self.prefs = prefs
        self.template_name = template_name

    def render(self, context: Context) -> str:
        """Renders the table; a value that is not get_user_preferences_for_ui()'s tuple renders
        nothing, or (DEBUG) raises SiteMessageConfigurationError so the mistake is seen."""
        prefs = self.prefs.resolve(context)
        if not (isinstance(prefs, tuple) and len(prefs) == 2):
            if settings.DEBUG:
                raise SiteMessageConfigurationError(
                    "`sitemessage_prefs_table` template tag expects the tuple returned by "
                    f"`get_user_preferences_for_ui`, got {type(prefs).__name__}"
                )
            return ""
        name = self.template_name.resolve(context) if self.template_name else DEFAULT_TEMPLATE
        # The engine of the page being rendered, as {% include %} does (one without a template,
        # a Context rendered by hand, gets the default engine).
        engine = context.template.engine if context.template else Engine.get_default()
        table = engine.get_template(name or DEFAULT_TEMPLATE)
        with context.push(sitemessage_user_prefs=prefs, sitemessage_prefs_rows=rows(prefs)):
            return table.render(context)


#: django-sitemessage's name of the node class.
sitemessage_prefs_tableNode = PrefsTableNode


def rows(prefs: tuple[list[str], dict[str, list[Any]]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """The table's rows, each cell with its column's messenger title."""
    titles, table = prefs
    return [
        (
            message_title,
            [
                {"messenger": messenger, "alias": c[0], "supported": c[1], "subscribed": c[2]}
                for messenger, c in zip(titles, cells, strict=False)
            ],
        )
        for message_title, cells in table.items()
    ]
