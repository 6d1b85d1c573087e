"""The built-in components, registered once here (a new component is one module and one line below)."""

from pathguard.models.components.base import register
from pathguard.models.components.consistency import (
    MarginComponent,
    NoiseDropComponent,
    NoiseFlipComponent,
    NoiseL1Component,
    SqueezeComponent,
)
from pathguard.models.components.effective_path import EffectivePathComponent
from pathguard.models.components.ep_channels import ChannelEPComponent
from pathguard.models.components.mahalanobis import GaussianComponent
from pathguard.models.components.nic import NICComponent, NICValueComponent
from pathguard.models.components.supervised import SupervisedComponent

for _cls in (
    EffectivePathComponent,
    ChannelEPComponent,
    NICComponent,
    NICValueComponent,
    GaussianComponent,
    MarginComponent,
    NoiseFlipComponent,
    NoiseL1Component,
    NoiseDropComponent,
    SqueezeComponent,
    SupervisedComponent,
):
    register(_cls)
