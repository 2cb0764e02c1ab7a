"""The network bandwidth of the instance types people train and serve models on.

The CRT has a figure of its own only for a few types (awscrt.s3.get_optimized_platforms(): p4d,
p5, trn1 ...) and targets 10 Gbit/s on every other. On a g5.48xlarge (100 Gbit/s) or a
g6e.48xlarge (400) that opens a tenth or less of the connections the NIC can fill, so a notice's
flush of a large checkpoint takes ten times as long as it need. This table fills the gap for
the accelerated-computing types.

Each figure is the type's baseline bandwidth in EC2's DescribeInstanceTypes
(NetworkInfo.NetworkCards[].BaselineBandwidthInGbps, summed), in Gbit/s. Types at or below the
CRT's 10 Gbit/s default ("up to" types such as g5.xlarge, whose baseline is 2.5) are left out:
the default already serves them. Figures above MAX_TABLE_GBPS are held to it (see there).
"""

from __future__ import annotations

# The most this table sets a target to. The CRT's own figure for a p5.48xlarge, whose 3,200
# Gbit/s are mostly EFA, which S3 traffic does not use; at 0.4 Gbit/s a connection it is
# already a thousand connections.
MAX_TABLE_GBPS = 400.0

BASELINE_GBPS: dict[str, float] = {
    # NVIDIA T4
    "g4dn.4xlarge": 20, "g4dn.8xlarge": 50, "g4dn.12xlarge": 50, "g4dn.16xlarge": 50,
    "g4dn.metal": 100,
    # AMD Radeon Pro V520
    "g4ad.8xlarge": 15, "g4ad.16xlarge": 25,
    # NVIDIA A10G
    "g5.8xlarge": 25, "g5.12xlarge": 40, "g5.16xlarge": 25, "g5.24xlarge": 50,
    "g5.48xlarge": 100,
    # NVIDIA T4G (Graviton)
    "g5g.8xlarge": 12, "g5g.16xlarge": 25, "g5g.metal": 25,
    # NVIDIA L4
    "g6.8xlarge": 25, "g6.12xlarge": 40, "g6.16xlarge": 25, "g6.24xlarge": 50,
    "g6.48xlarge": 100, "gr6.8xlarge": 25,
    # NVIDIA L40S
    "g6e.4xlarge": 20, "g6e.8xlarge": 25, "g6e.12xlarge": 100, "g6e.16xlarge": 35,
    "g6e.24xlarge": 200, "g6e.48xlarge": 400,
    # NVIDIA RTX PRO Blackwell
    "g7.2xlarge": 40, "g7.4xlarge": 80, "g7.8xlarge": 100, "g7.12xlarge": 175,
    "g7.24xlarge": 350, "g7.48xlarge": 700,
    "g7e.2xlarge": 50, "g7e.4xlarge": 50, "g7e.8xlarge": 100, "g7e.12xlarge": 400,
    "g7e.24xlarge": 800, "g7e.48xlarge": 1600,
    # NVIDIA M60
    "g3.16xlarge": 25,
    # NVIDIA V100
    "p3.16xlarge": 25, "p3dn.24xlarge": 100,
    # NVIDIA A100, H100, H200, B200, GB200, B300
    "p4d.24xlarge": 400, "p4de.24xlarge": 400, "p5.4xlarge": 100, "p5.48xlarge": 3200,
    "p5e.48xlarge": 3200, "p5en.48xlarge": 3200, "p6-b200.48xlarge": 3200,
    "p6e-gb200.36xlarge": 3200, "p6-b300.48xlarge": 6400,
    # AWS Trainium, Inferentia
    "trn1.32xlarge": 800, "trn1n.32xlarge": 1600, "trn2.3xlarge": 200,
    "trn2.48xlarge": 3200, "trn2u.48xlarge": 3200,
    "inf1.6xlarge": 25, "inf1.24xlarge": 100,
    "inf2.8xlarge": 16.667, "inf2.24xlarge": 50, "inf2.48xlarge": 100,
    # Intel Gaudi, Qualcomm AI 100
    "dl1.24xlarge": 400, "dl2q.24xlarge": 100,
}


def network_gbps(instance_type: str | None) -> float | None:
    """The target for this instance type's NIC, at most MAX_TABLE_GBPS; None when the table
    has no figure for it (or there is no instance type: not on EC2)."""
    if instance_type is None:
        return None
    baseline = BASELINE_GBPS.get(instance_type)
    return None if baseline is None else min(float(baseline), MAX_TABLE_GBPS)
