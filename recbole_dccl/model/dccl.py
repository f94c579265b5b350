r"""DCCL
################################################
Reference:
    Jiangchao Yao et al. "Device-Cloud Collaborative Learning for Recommendation." in KDD 2021.
    https://arxiv.org/abs/2104.06624

One model, two views. The **cloud** view is the backbone (any RecBole sequential or CTR model, W_f) exactly as
RecBole runs it. The **device** view is the same backbone with a MetaPatch at each patch site whose weights are
generated from the user's metapatch (looked up by ``USER_ID_FIELD``) through the global shared parameters Theta.
The auxiliary encoder maps what the cloud knows of a user to a metapatch (MoMoDistill step 2, cold start).
With ``device_method: patch`` (an ablation) each user holds its patches' weights themselves instead of a
metapatch. With ``device_memory`` the device view also scores the user's own items from the history the device
holds (:mod:`~recbole_dccl.model.memory`), with weights every device shares.
"""

from contextlib import contextmanager

import torch
from recbole.model.abstract_recommender import AbstractRecommender
from torch import nn

from recbole_dccl.errors import InputError
from recbole_dccl.model.encoder import AuxiliaryEncoder
from recbole_dccl.model.families import FAMILIES, family_of
from recbole_dccl.model.lookup import recbole_model_class
from recbole_dccl.model.memory import PersonalMemory
from recbole_dccl.model.metapatch import MetaPatch, PatchContext, UserPatch, find_sites, site_output_dims, wrap_site

HISTORY_LENGTH = 50


class DCCL(AbstractRecommender):
    r"""DCCL wraps a RecBole backbone (the cloud model) and adds per-user MetaPatches (the device models)."""

    is_dccl = True
    VIEWS = ("cloud", "device")

    @staticmethod
    def backbone_class_for(name):
        """The RecBole class of backbone ``name``, refused with a clear message if DCCL cannot wrap it."""
        supported = ", ".join(FAMILIES)
        backbone_class = recbole_model_class(name, "backbone", f"a RecBole model of these families: {supported} (CTR)")
        if family_of(backbone_class) is None:
            raise InputError(
                f"backbone: [{name}] is a {backbone_class.type.name.lower()} model; "
                f"DCCL wraps RecBole models of these families: {', '.join(FAMILIES)} (CTR)."
            )
        return backbone_class

    def __init__(self, config, dataset):
        super().__init__()
        backbone_class = self.backbone_class_for(config["backbone"])
        self.type = backbone_class.type
        self.USER_ID = config["USER_ID_FIELD"]
        self.backbone = backbone_class(config, dataset)
        family = family_of(backbone_class)
        self.objective = family.objective(self.backbone, config)
        self.view = "cloud"

        has_memory = config["device_memory"] and config["device_method"] != "none"
        self.memory = PersonalMemory(dataset) if has_memory else None
        # Everything outside the backbone draws from a random stream of its own: how many numbers the patches and
        # the encoder draw depends on the device-side settings, and on the global stream it would change round 0,
        # which trains the backbone from there (so two device settings would be compared on two cloud models).
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(config["seed"])
            metapatch_dim = self._add_device_side(config, dataset, family)
        if not self.encoder.has_profile:
            self.logger.warning("DCCL: the dataset has no .user profile features; the encoder runs without them.")
        n_users = dataset.num(self.USER_ID)
        # metapatch: what each device runs now; uploaded_metapatch: what each device sent after its last training.
        self.register_buffer("metapatch", torch.zeros(n_users, metapatch_dim))
        self.register_buffer("uploaded_metapatch", torch.zeros(n_users, metapatch_dim))
        self.register_buffer("user_history", torch.zeros(n_users, HISTORY_LENGTH, dtype=torch.long), persistent=False)

    def _add_device_side(self, config, dataset, family):
        """The patches at the backbone's patch sites and the auxiliary encoder; returns the metapatch size."""
        patterns = config["patch_sites"] or family.default_sites(self.backbone)
        sites = find_sites(self.backbone, "backbone", [patterns] if isinstance(patterns, str) else patterns)
        dims = site_output_dims(sites, lambda: self._dry_run(dataset))
        self.patches, metapatch_dim = self._build_patches(config, dims)
        self.context = PatchContext()
        for name, module in sites.items():
            wrap_site(name, module, self.patches[self._key(name)], self.context)
        self.encoder = AuxiliaryEncoder(
            dataset, metapatch_dim, config["encoder_embedding_size"], config["encoder_hidden_size"]
        )
        return metapatch_dim

    def _build_patches(self, config, dims):
        """One patch per site, and the size of the vector each user holds (its metapatch, or for
        ``device_method: patch`` all its patches' weights)."""
        rank = config["patch_rank"]
        if config["device_method"] != "patch":
            metapatch_dim = config["metapatch_dim"]
            patches = {self._key(name): MetaPatch(dim, rank, metapatch_dim) for name, dim in dims.items()}
            return nn.ModuleDict(patches), metapatch_dim
        patches, offset = {}, 0
        for name, dim in dims.items():
            patches[self._key(name)] = UserPatch(dim, rank, offset)
            offset += UserPatch.size(dim, rank)
        return nn.ModuleDict(patches), offset

    @staticmethod
    def _key(site_name):
        return site_name.replace(".", "__")

    @torch.no_grad()
    def _dry_run(self, dataset):
        training = self.backbone.training
        self.backbone.eval()
        try:
            self.objective.logits(dataset[torch.arange(min(2, len(dataset)))])
        finally:
            self.backbone.train(training)

    @contextmanager
    def patched(self, metapatch):
        """Run the backbone as the device models of the given metapatch rows (``None``: as the cloud model)."""
        self.context.metapatch = metapatch
        try:
            yield
        finally:
            self.context.metapatch = None

    def view_metapatch(self, interaction):
        """The metapatch rows of the current view: each row's user's in the device view, none in the cloud view."""
        return self.metapatch[interaction[self.USER_ID]] if self.view == "device" else None

    def hold_histories(self, datasets):
        """Let the memory read the users' histories from ``datasets`` (the training split first, then the splits the
        run evaluates on); without this call it holds the training split's."""
        if self.memory is not None:
            self.memory.hold(datasets)

    def forward(self, interaction, metapatch=None):
        """The objective's logits, of the cloud model or of the device models of ``metapatch`` (one row each)."""
        if self.remembers(metapatch):
            self.memory.complete(interaction)
        with self.patched(metapatch):
            logits = self.objective.logits(interaction)
        if self.remembers(metapatch):
            logits = self.memory.add(logits, interaction)
        return logits

    def encode_metapatch(self, users):
        """The auxiliary encoder's metapatch for ``users``."""
        return self.encoder(users, self.user_history[users], self.uploaded_metapatch[users])

    def remembers(self, metapatch):
        """Whether scoring under ``metapatch`` runs the memory (the backbone's own methods would leave it out)."""
        return metapatch is not None and self.memory is not None

    def calculate_loss(self, interaction):
        metapatch = self.view_metapatch(interaction)
        if self.remembers(metapatch):
            return self.objective.loss(self(interaction, metapatch), interaction).mean()
        with self.patched(metapatch):
            return self.backbone.calculate_loss(interaction)

    def predict(self, interaction):
        metapatch = self.view_metapatch(interaction)
        if self.remembers(metapatch):
            return self.objective.prediction(self(interaction, metapatch), interaction)
        with self.patched(metapatch):
            return self.backbone.predict(interaction)

    def full_sort_predict(self, interaction):
        metapatch = self.view_metapatch(interaction)
        if self.remembers(metapatch):
            return self(interaction, metapatch)  # the logits: for every backbone, ranked as its scores are
        with self.patched(metapatch):
            return self.backbone.full_sort_predict(interaction)
