"""`verticals users ...`: account management (the first admin is created here, never by default)."""

from __future__ import annotations

from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    users = typer.Typer(help="Console accounts and roles.", no_args_is_help=True)

    @users.command("create")
    def create(
        username: str,
        role: Annotated[str, typer.Option(help="admin, agent, radiologist or operator")] = "admin",
        password: Annotated[str | None, typer.Option(help="Omit to be prompted (recommended).")] = None,
    ) -> None:
        """Create a console account."""
        from core.auth import create_user

        pw = password or typer.prompt("password", hide_input=True, confirmation_prompt=True)
        create_user(username, pw, role)
        typer.echo(f"created {role} {username}")

    @users.command("list")
    def list_users() -> None:
        """List accounts."""
        from sqlalchemy import select

        from core.auth import User
        from core.db import session_scope

        with session_scope() as s:
            for u in s.scalars(select(User).order_by(User.username)):
                typer.echo(f"{u.username}\t{u.role}\t{'active' if u.active else 'disabled'}")

    app.add_typer(users, name="users")
