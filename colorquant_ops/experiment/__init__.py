"""The experiment and the ``colorquant`` command: what reproduces the paper, apart from the library.

Nothing in the library (:mod:`colorquant_ops.ops`, :mod:`~colorquant_ops.models`,
:mod:`~colorquant_ops.transforms`, :mod:`~colorquant_ops.quantizers`, :mod:`~colorquant_ops.codecs`,
:mod:`~colorquant_ops.losses`) imports this package; this package uses the library as any user would.

* :mod:`.cli` -- the ``colorquant`` parser, built from each command module's :class:`~.commands.Command`;
* :mod:`.commands` -- what a subcommand is; :mod:`.arguments` -- option types shared by the commands;
* :mod:`.train` -- ``train-classifier`` and ``train``: the shared epoch loop and both trainers;
* :mod:`.evaluate` -- ``evaluate``: every method x K through a frozen classifier, tables and plots;
* :mod:`.quantize_files` -- ``quantize``: image files to palette PNGs and a picture sheet;
* :mod:`.presets` -- ``reproduce``: a whole experiment from a named preset, and its report;
* :mod:`.demo` -- ``demo``: the paper's point on bundled images with bundled weights;
* :mod:`.gradcam` -- ``gradcam``: class activation maps of the frozen classifier per method and K;
* :mod:`.rundir` -- a run's directory and the RNG states that ``--resume`` restores;
* :mod:`.distributed` -- multi-process (torchrun) training pieces;
* :mod:`.sheets` -- labelled picture sheets;
* :mod:`.data` -- datasets, the paper's preprocessing, the CIFAR-10 JPEG copy, the tensor cache.
"""
