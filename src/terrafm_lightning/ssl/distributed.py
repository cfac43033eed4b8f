"""FSDP2 sharding of the student and the teacher (``ModelParallelStrategy``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch.distributed.device_mesh import DeviceMesh

if TYPE_CHECKING:
    from terrafm_lightning.ssl.student_teacher import StudentTeacher


def shard_student_teacher(
    student: StudentTeacher, teacher: StudentTeacher, mesh: DeviceMesh
) -> None:
    """Shard student and teacher alike with FSDP2 over ``mesh``.

    Every transformer block, then the rest of each backbone and each head, becomes an FSDP
    unit, so the teacher's shards line up with the student's and the EMA update stays local.
    The backbone and head are sharded rather than their ``StudentTeacher`` parent because the
    steps call them directly: FSDP2 gathers a unit's parameters in its own ``forward``.
    """
    from torch.distributed.fsdp import fully_shard

    for net in (student, teacher):
        for block in net.backbone.blocks:
            fully_shard(block, mesh=mesh)
        for part in (net.backbone, net.head):
            # FSDP2 keeps a root unit whole after forward until its backward; the teacher
            # has no backward, so it must reshard at once or EMA would meet whole tensors.
            fully_shard(part, mesh=mesh, reshard_after_forward=True if net is teacher else None)
    # A modality absent from every crop of one rank leaves its stem without a gradient
    # there; reduce-scattering zeros keeps the ranks' collectives the same size.
    for part in (student.backbone, student.head):
        part.set_reduce_scatter_unused_params(True)
