# "Be Your Own Teacher" (Zhang et al., ICCV 2019) CIFAR-100 recipe for ResNet-18, for GPU users.
#
# Recipe: SGD, lr 0.1, momentum 0.9, weight decay 5e-4, batch 128 on one GPU, 200 epochs, lr x0.1 at
# epochs 100 and 150 (1/2 and 3/4 of training); T = 3, alpha (kd_weight) = 0.3 with the exits' label
# cross-entropy weighted 1 - alpha = 0.7, lambda (hint_weight) = 0.03, deepest classifier on plain CE.
# Source: BYOT paper Sec. 4 and the sd_plugin tracker's recipe. The step epochs could not be checked
# against the authors' training script offline; the loss weights match sd_plugin.core.config, whose
# docstring cites the authors' code. Exits: after ResNet stages 1-3 (BYOT's three shallow classifiers).
#
# Data: mmpretrain's CIFAR100 data set (downloads to data/cifar100 on first use).
# Train: sd-plugin train configs/resnet18_cifar100_byot.py
#    or: mim train mmpretrain configs/resnet18_cifar100_byot.py
_base_ = ['mmpretrain::resnet/resnet50_8xb16_cifar100.py']

model = dict(
    type='sd_plugin.SelfDistillClassifier',
    backbone=dict(depth=18),
    head=dict(in_channels=512, num_classes=100),
    temperature=3.0,
    ce_weight=0.7,
    kd_weight=0.3,
    hint_weight=0.03,
    deepest_weight=1.0,
)

train_dataloader = dict(batch_size=128, num_workers=4)
val_dataloader = dict(batch_size=256, num_workers=4)
test_dataloader = val_dataloader

optim_wrapper = dict(optimizer=dict(type='SGD', lr=0.1, momentum=0.9, weight_decay=5e-4))
param_scheduler = dict(_delete_=True, type='MultiStepLR', by_epoch=True, milestones=[100, 150], gamma=0.1)
train_cfg = dict(by_epoch=True, max_epochs=200, val_interval=1)

val_evaluator = dict(_delete_=True, type='sd_plugin.MultiExitAccuracy', topk=(1, 5))
test_evaluator = val_evaluator

default_hooks = dict(checkpoint=dict(type='CheckpointHook', interval=10, max_keep_ckpts=2,
                                     save_best='multi-exit/deepest_top1'))
auto_scale_lr = dict(base_batch_size=128)
