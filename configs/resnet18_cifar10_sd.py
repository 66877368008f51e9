# ResNet-18 (CIFAR variant) with teacher-free self-distillation on CIFAR-10 JPEGs (ImageFolder layout).
#
# Train:  sd-plugin train configs/resnet18_cifar10_sd.py
#    or:  mim train mmpretrain configs/resnet18_cifar10_sd.py
# Data:   <data_root>/{train,test}/<class>/*.jpg (extract shared/data/cifar10/cifar10_jpg.tar.gz there);
#         elsewhere: --cfg-options train_dataloader.dataset.data_root=DIR val_dataloader.dataset.data_root=DIR
#         test_dataloader.dataset.data_root=DIR.
_base_ = ['mmpretrain::resnet/resnet18_8xb16_cifar10.py']

# The one line that turns any ImageClassifier config into self-distillation (no custom_imports needed):
model = dict(type='sd_plugin.SelfDistillClassifier')  # BYOT defaults: T=3, ce 0.7, kd 0.3, hint 0.03

# '~/.cache/sd_plugin/cifar10', expanded by mmengine's environment-variable substitution.
data_root = '{{$HOME:~}}/.cache/sd_plugin/cifar10'

# JPEGs are decoded as BGR; the CIFAR-10 mean/std of the base config are RGB.
data_preprocessor = dict(num_classes=10, to_rgb=True)

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='RandomCrop', crop_size=32, padding=4),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(type='PackInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='PackInputs'),
]

train_dataloader = dict(
    batch_size=128,
    num_workers=2,
    dataset=dict(_delete_=True, type='CustomDataset', data_root=data_root, data_prefix='train',
                 pipeline=train_pipeline),
    sampler=dict(type='DefaultSampler', shuffle=True),
)
val_dataloader = dict(
    batch_size=256,
    num_workers=2,
    dataset=dict(_delete_=True, type='CustomDataset', data_root=data_root, data_prefix='test',
                 pipeline=test_pipeline),
    sampler=dict(type='DefaultSampler', shuffle=False),
)
test_dataloader = val_dataloader

# Top-1 of every exit, the deepest classifier and the ensemble.
val_evaluator = dict(_delete_=True, type='sd_plugin.MultiExitAccuracy', topk=(1, ))
test_evaluator = val_evaluator

default_hooks = dict(checkpoint=dict(type='CheckpointHook', interval=10, max_keep_ckpts=2,
                                     save_best='multi-exit/deepest_top1'))

# The base config's 8 GPUs x 16 images are replaced by one process with 128 images (same lr 0.1).
auto_scale_lr = dict(base_batch_size=128)
