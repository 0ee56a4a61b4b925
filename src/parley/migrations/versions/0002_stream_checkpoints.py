"""stream checkpoints for SSE event ids

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22 00:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "stream_checkpoints",
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("positions", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["users.id"],
            name=op.f("fk_stream_checkpoints_user_id_users"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_stream_checkpoints")),
    )
    with op.batch_alter_table("stream_checkpoints", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_stream_checkpoints_created_at"), ["created_at"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_stream_checkpoints_user_id"), ["user_id"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("stream_checkpoints", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_stream_checkpoints_user_id"))
        batch_op.drop_index(batch_op.f("ix_stream_checkpoints_created_at"))

    op.drop_table("stream_checkpoints")
