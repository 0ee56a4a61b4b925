"""conversations.member_seq: the seq of the latest change of members

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-21 00:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Plain ALTER TABLE on SQLite too (3.35+): a batch copy of the table would drop
    # its expression index, which reflection cannot read back.
    op.add_column(
        "conversations", sa.Column("member_seq", sa.Integer(), server_default="0", nullable=False)
    )
    # Existing conversations: any seq up to the last one may have changed the members,
    # and a send compares only whether it moved, so the last seq is a safe start.
    op.execute("UPDATE conversations SET member_seq = last_seq")


def downgrade() -> None:
    op.drop_column("conversations", "member_seq")
