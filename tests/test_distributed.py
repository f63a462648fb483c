"""Multi-host start-up (medplib_jax/distributed.py) and the launch scripts (launch/).

Unit tests: which environments make `--distributed=auto` call jax.distributed.initialize (a fake one records the
arguments), and the one-line errors of `--distributed=explicit`. Then a real multi-host run: two JAX processes of
4 fake CPU devices each train stage IV for 3 steps through the grain pipeline, against one process of 8 devices.
"""
import dataclasses
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from support.commands import run_command  # noqa: E402
from support.ports import free_port  # noqa: E402
from support.train_utils import make_data

from medplib_jax import distributed
from medplib_jax.checkpoint import FINAL_PARAMS, restore_params

pytestmark = pytest.mark.heavy_module  # scheduled first (tests/conftest.py)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, 'launch')
CLUSTER_ENV = ('SLURM_', 'OMPI_', 'TPU_', 'MEGASCALE_', 'JAX_COORDINATOR', 'JAX_LOCAL_DEVICE_IDS',
               'CUDA_VISIBLE_DEVICES', 'KUBERNETES_SERVICE_HOST')


# --------------------------------------------------------------------------------------------------------------
# Mode and environment detection (a fake jax.distributed.initialize)


@pytest.fixture
def fake_init(monkeypatch):
    """No cluster variables; jax.distributed.initialize replaced by a recorder (-> the list of its kwargs)."""
    for key in list(os.environ):
        if key.startswith(CLUSTER_ENV):
            monkeypatch.delenv(key)
    jax.devices()  # the backend exists before the fake client below (its report line reads the devices)
    from jax._src import distributed as jax_distributed
    monkeypatch.setattr(jax_distributed.global_state, 'client', None)
    calls = []

    def initialize(**kwargs):
        calls.append(kwargs)
        jax_distributed.global_state.client = object()  # what a real start leaves behind
    monkeypatch.setattr(jax.distributed, 'initialize', initialize)
    return calls


def _slurm(monkeypatch, *, tasks, per_node, node=0, local=0, step_tasks=None, gpus=None):
    env = dict(SLURM_JOB_ID='4242', SLURM_STEP_NODELIST='gpu[003-004]', SLURM_NTASKS=str(tasks),
               SLURM_PROCID=str(node * int(per_node.split('(')[0]) + local), SLURM_LOCALID=str(local),
               SLURM_NODEID=str(node), SLURM_STEP_TASKS_PER_NODE=per_node,
               SLURM_STEP_NUM_TASKS=str(tasks if step_tasks is None else step_tasks))
    if gpus is not None:
        env['CUDA_VISIBLE_DEVICES'] = gpus
    for k, v in env.items():
        monkeypatch.setenv(k, v)


def test_plain_environment_and_off_start_nothing(fake_init, monkeypatch):
    distributed.initialize('auto')
    distributed.initialize('off')
    _slurm(monkeypatch, tasks=16, per_node='8(x2)')
    distributed.initialize('off')  # off means off, even in a multi-task SLURM step
    assert fake_init == []
    with pytest.raises(ValueError, match=r"^--distributed='on': expected one of auto, off, explicit$"):
        distributed.initialize('on')


def test_slurm_multi_task_step_initialises_one_process_per_gpu(fake_init, monkeypatch, capsys):
    _slurm(monkeypatch, tasks=16, per_node='8(x2)', node=1, local=3)
    assert distributed.detect() == distributed.Cluster('slurm', 16)
    distributed.initialize('auto')
    assert fake_init == [dict(cluster_detection_method='slurm', local_device_ids=[3])]
    # jax's own SLURM detector fills in the rest: coordinator = the step's first node, port from the job id
    from jax._src import clusters
    address, count, pid, local = clusters.ClusterEnv.auto_detect_unset_distributed_params(
        None, None, None, [3], 'slurm', 10)
    assert (address, count, pid, local) == (f'gpu003:{4242 % 4096 + 61440}', 16, 11, [3])
    assert 'jax.distributed (slurm): process 0 of' in capsys.readouterr().out  # this pytest process is process 0
    distributed.initialize('auto')  # a second call is harmless
    assert len(fake_init) == 1


@pytest.mark.parametrize('per_node, gpus', [('1(x2)', None), ('8(x2)', '5')])
def test_slurm_all_visible_gpus_when_one_task_per_node_or_gpu_bound(fake_init, monkeypatch, per_node, gpus):
    # One task per node: jax alone would keep only GPU $SLURM_LOCALID = 0; a task SLURM bound to GPU 5 sees it as 0.
    _slurm(monkeypatch, tasks=2 if per_node == '1(x2)' else 16, per_node=per_node, gpus=gpus, local=0)
    distributed.initialize('auto')
    assert fake_init == [dict(cluster_detection_method='slurm', local_device_ids=[])]


def test_slurm_given_local_device_ids_win(fake_init, monkeypatch):
    _slurm(monkeypatch, tasks=4, per_node='2(x2)', local=1)
    distributed.initialize('auto', local_device_ids=['2', '3'])
    assert fake_init == [dict(cluster_detection_method='slurm', local_device_ids=[2, 3])]


@pytest.mark.parametrize('tasks, step_tasks', [(1, 1), (8, 1)])
def test_single_slurm_task_starts_nothing(fake_init, monkeypatch, tasks, step_tasks):
    # (8, 1): a bare `python` in an sbatch script of 8 tasks is the batch step, one process
    _slurm(monkeypatch, tasks=tasks, per_node='1', step_tasks=step_tasks)
    distributed.initialize('auto')
    assert fake_init == [] and distributed.detect() is None


def test_tpu_pod_slice_is_detected_by_jax_and_single_host_is_not(fake_init, monkeypatch):
    from jax._src.clusters import cloud_tpu_cluster
    monkeypatch.setattr(cloud_tpu_cluster, 'running_in_cloud_tpu_vm', True)
    monkeypatch.setenv('TPU_SKIP_MDS_QUERY', '1')  # never ask a GCE metadata server from a test
    monkeypatch.setenv('TPU_WORKER_HOSTNAMES', 'w-0')  # GKE's variables (a GCE TPU VM reads its metadata)
    monkeypatch.setenv('TPU_WORKER_ID', '0')
    monkeypatch.setenv('MEGASCALE_NUM_SLICES', '1')
    distributed.initialize('auto')
    assert fake_init == []  # one TPU VM host: one process
    monkeypatch.setenv('TPU_WORKER_HOSTNAMES', 'w-0,w-1,w-2,w-3')
    monkeypatch.setenv('TPU_WORKER_ID', '2')
    monkeypatch.setenv('MEGASCALE_NUM_SLICES', '2')
    assert distributed.detect() == distributed.Cluster('gketpu', 8)
    distributed.initialize('auto')
    assert fake_init == [dict(cluster_detection_method='gketpu', local_device_ids=None)]  # chips: jax's business


def test_explicit_passes_the_flags_and_ignores_the_environment(fake_init, monkeypatch):
    _slurm(monkeypatch, tasks=16, per_node='8(x2)', local=3)
    distributed.initialize('explicit', coordinator='10.0.0.1:1234', num_processes=2, process_id=1)
    assert fake_init == [dict(coordinator_address='10.0.0.1:1234', num_processes=2, process_id=1,
                              local_device_ids=None, cluster_detection_method='deactivate')]
    assert jax.config.jax_cpu_collectives_implementation == 'gloo'


@pytest.mark.parametrize('kwargs, flag', [
    (dict(num_processes=2, process_id=0), '--coordinator'),
    (dict(coordinator='10.0.0.1', num_processes=2, process_id=0), '--coordinator=10.0.0.1'),
    (dict(coordinator='10.0.0.1:99999', num_processes=2, process_id=0), '--coordinator=10.0.0.1:99999'),
    (dict(coordinator='h:1', process_id=0), '--num_processes'),
    (dict(coordinator='h:1', num_processes=2), '--process_id'),
    (dict(coordinator='h:1', num_processes=2, process_id=2), '--process_id'),
    (dict(coordinator='h:1', num_processes=2, process_id=0, local_device_ids=['0', 'x']), '--local_device_ids'),
    (dict(coordinator='h:1', num_processes=2, process_id=0, local_device_ids=[1, 1]), '--local_device_ids'),
])
def test_explicit_bad_flags_are_one_line_naming_the_flag(fake_init, kwargs, flag):
    with pytest.raises(ValueError) as e:
        distributed.initialize('explicit', **kwargs)
    assert flag in str(e.value) and '\n' not in str(e.value)
    assert fake_init == []


@pytest.mark.e2e
def test_cli_explicit_without_coordinator_is_one_line(tmp_path):
    res = run_command('train', '--distributed=explicit', '--num_processes=2', '--process_id=0', f'--workdir={tmp_path}')
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].startswith('medplib-jax train: --distributed=explicit needs '
                                                          '--coordinator=HOST:PORT')


# --------------------------------------------------------------------------------------------------------------
# Launch scripts


@pytest.mark.parametrize('script', ['local.sh', 'tpu_pod.sh', 'gpu_slurm.sbatch'])
def test_launch_script_parses_and_has_a_usage_header(script):
    path = os.path.join(LAUNCH, script)
    res = subprocess.run(['bash', '-n', path], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    with open(path) as f:
        head = f.read(2000)
    assert head.startswith('#!') and '# Usage: ' in head and 'medplib-jax' in head


def test_local_sh_passes_its_arguments_to_the_entry_point(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=ROOT)
    env.pop('MEDPLIB_JAX', None)
    res = subprocess.run(['bash', os.path.join(LAUNCH, 'local.sh'), 'make-demo-data', str(tmp_path / 'd'),
                          '--num_images=1'], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    # one image: one grounding question per shape (1 to 3)
    assert re.search(rf'{re.escape(str(tmp_path))}/d/MeCoVQA_Grounding_train.json: [123] records', res.stdout)
    assert (tmp_path / 'd' / 'MeCoVQA_Complex_VQA_train.json').exists()


def test_tpu_pod_sh_runs_the_entry_point_on_every_worker():
    env = dict(os.environ, TPU_NAME='pod', ZONE='us-east5-a', DRY_RUN='1')
    res = subprocess.run(['bash', os.path.join(LAUNCH, 'tpu_pod.sh'), '--workdir=/mnt/runs/x',
                          '--config=configs/stage4.py:model=tiny,init=random'],
                         capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert out.startswith('gcloud compute tpus tpu-vm ssh pod --zone=us-east5-a --worker=all --command=')
    remote = subprocess.run(['bash', '-c', f'printf "%s" {out.split("--command=", 1)[1].strip()}'],
                            capture_output=True, text=True).stdout  # the command line as the workers' shell gets it
    assert remote == ('cd ~/medplib-jax && .venv/bin/medplib-jax train --distributed=auto --workdir=/mnt/runs/x '
                      '--config=configs/stage4.py:model=tiny\\,init=random')


# --------------------------------------------------------------------------------------------------------------
# A real multi-host run: 2 processes x 4 CPU devices against 1 process x 8 devices

# Stage IV (MoE, LoRA with dropout, masks, loss groups of 4 = the recipe's) on the synthetic data; the mesh puts the
# data axis across the two processes. Each process loads its contiguous block of every global batch
# (data/shard.py EvenShard), so the two processes train on the very global batches of one: the same loss groups
# and the same per-row random draws (LoRA dropout, MoE token selection).
TRAIN = ('--config=configs/stage4.py:model=tiny,init=random', '--config.data.batch_size=8',
         '--config.mesh.data=4', '--config.mesh.fsdp=2', '--config.model.moe.group_size=1',
         '--config.train.max_steps=3', '--config.train.log_every=1', '--config.data.worker_count=0',
         '--config.evals.held_out.max_batches=1')
# Equal up to float32 reduction order: the gradient all-reduce over 8 devices adds the same numbers in another
# order when half of them come from the other process (gloo's cross-process reduction vs one process's in-memory
# one), so bit-equality is not promised; the difference is a few ulps per step, far below these bounds.
# Parameters move by about lr (3e-4) per step (the first runs at lr 0; measured apart: 6e-8). Except
# the attention key biases: softmax ignores a shift shared by all keys, so their true gradient is exactly 0 and
# Adam (which divides by the gradient's own scale) turns rounding noise into steps of up to ~lr either way.
RTOL, ATOL, ATOL_PARAMS = 1e-5, 1e-6, 1e-5
ZERO_GRADIENT, ATOL_ZERO_GRADIENT = ('k_proj/bias',), 4 * 3e-4


@dataclasses.dataclass
class Proc:
    """One finished CLI process."""
    returncode: int
    stdout: str
    stderr: str


def start_cli(args, *, devices, env=None):
    """`python -m medplib_jax ARGS` on `devices` fake CPU devices, started (not waited for)."""
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu',
               XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}', **(env or {}))
    return subprocess.Popen([sys.executable, '-m', 'medplib_jax', *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)


def start_processes(args, *, num_processes=2, devices=4):
    """The same CLI command in `num_processes` JAX processes of `devices` CPU devices each, joined through
    `--distributed=explicit` on a free loopback port (what launch/ does on a real cluster)."""
    port = free_port()
    return [start_cli([*args, '--distributed=explicit', f'--coordinator=127.0.0.1:{port}',
                       f'--num_processes={num_processes}', f'--process_id={i}'], devices=devices)
            for i in range(num_processes)]


def wait(procs, timeout=1800):
    """Waits for every process (all killed if one hangs) -> their outputs."""
    out = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=timeout)
            out.append(Proc(p.returncode, stdout, stderr))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return out


@dataclasses.dataclass
class Runs:
    multi: str  # the 2-process run's workdir
    single: str  # the 1-process, 8-device run's workdir
    procs: list  # the 2 processes' outputs
    reference: Proc


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    """Both trainings at once (three processes, so the 2 cores compile in parallel)."""
    tmp = tmp_path_factory.mktemp('multihost')
    data = make_data(tmp / 'data')
    multi, single = str(tmp / 'multi'), str(tmp / 'single')
    args = ('train', *TRAIN, f'--config.data.root={data}')
    procs = start_processes([*args, f'--workdir={multi}'])
    reference = start_cli([*args, f'--workdir={single}', '--distributed=off'], devices=8)
    *outs, ref = wait([*procs, reference])
    for i, p in enumerate(outs):
        assert p.returncode == 0, f'process {i}:\n{p.stderr[-4000:]}'
    assert ref.returncode == 0, ref.stderr[-4000:]
    return Runs(multi, single, outs, ref)


def _metrics(workdir):
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
@pytest.mark.e2e
def test_two_processes_train_the_same_losses_as_one(runs):
    multi, single = _metrics(runs.multi), _metrics(runs.single)
    train = [m for m in multi if 'loss' in m]
    assert [m['step'] for m in train] == [1, 2, 3]  # each step once: one writer
    assert [m['step'] for m in multi] == [m['step'] for m in single]
    worst = 0.0
    for a, b in zip(multi, single):
        keys = {k for k in a if k.startswith(('loss', 'mask/', 'accuracy', 'grad_norm', 'lr', 'moe/', 'eval/'))}
        assert keys and keys == {k for k in b if k in keys}
        for k in sorted(keys):
            np.testing.assert_allclose(a[k], b[k], rtol=RTOL, atol=ATOL, err_msg=f'step {a["step"]} {k}')
            worst = max(worst, abs(a[k] - b[k]) / max(abs(b[k]), 1e-12))
    print(f'losses {[m["loss"] for m in train]}; largest relative difference of a logged metric {worst:.3g}')


@pytest.mark.slow
@pytest.mark.e2e
def test_only_process_0_logs(runs):
    p0, p1 = runs.procs
    assert 'jax.distributed (explicit): process 0 of 2, 4 local / 8 global devices (cpu)' in p0.stdout
    assert 'step 3/3: loss' in p0.stdout and 'stage IV done' in p0.stdout
    assert 'step 1/3' not in p1.stdout and 'jax.distributed' not in p1.stdout and 'stage IV' not in p1.stdout
    events = os.listdir(os.path.join(runs.multi, 'tensorboard'))
    assert len([e for e in events if e.startswith('events.out.tfevents.')]) == 1
    assert 'Traceback' not in p0.stderr + p1.stderr


@pytest.mark.slow
@pytest.mark.e2e
def test_final_params_of_two_processes_restore_in_one(runs):
    # Written by both processes (each its own shards); read here, in one process, onto one device.
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    multi = restore_params(os.path.join(runs.multi, FINAL_PARAMS), lambda k, s: one)
    single = restore_params(os.path.join(runs.single, FINAL_PARAMS), lambda k, s: one)
    assert multi.keys() == single.keys() and len(multi) > 100
    nonzero, worst = 0, 0.0
    for k in multi:
        a, b = np.asarray(multi[k]), np.asarray(single[k])
        assert a.shape == b.shape and a.dtype == b.dtype, k
        atol = ATOL_ZERO_GRADIENT if k.endswith(ZERO_GRADIENT) else ATOL_PARAMS
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=atol, err_msg=k)
        nonzero += int(np.abs(a).max() > 0)
        if not k.endswith(ZERO_GRADIENT):
            worst = max(worst, float(np.abs(a - b).max()))
    assert nonzero > 100  # real values, not an empty restore
    print(f'final_params: {len(multi)} arrays, largest difference {worst:.3g} (key biases aside)')


def _state_on_one_device(workdir, step):
    """A train-state checkpoint read whole onto this process's first device (every array, by path)."""
    import orbax.checkpoint as ocp

    from medplib_jax.checkpoint import CHECKPOINTS, STATE
    from medplib_jax.tree import key_path
    path = os.path.join(workdir, CHECKPOINTS, str(step), STATE)
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    saved = ocp.StandardCheckpointer().metadata(path).item_metadata.tree
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), saved)
    tree = ocp.StandardCheckpointer().restore(path, target)
    return {key_path(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.slow
@pytest.mark.e2e
def test_the_train_state_checkpoint_of_two_processes_restores_in_one(runs):
    # checkpoints/3 (the last step): parameters, Adam moments and counters, each process writing its own shards,
    # and one data-iterator state per process.
    from medplib_jax.checkpoint import CHECKPOINTS, DATA
    data = os.listdir(os.path.join(runs.multi, CHECKPOINTS, '3', DATA))
    assert sorted(f for f in data if f.endswith('.json')) == ['process_0-of-2.json', 'process_1-of-2.json']
    multi, single = _state_on_one_device(runs.multi, 3), _state_on_one_device(runs.single, 3)
    assert multi.keys() == single.keys() and sum('opt_state' in k for k in multi) > 100
    for k in multi:
        assert multi[k].shape == single[k].shape and multi[k].dtype == single[k].dtype, k
        atol = ATOL_ZERO_GRADIENT if k.endswith(ZERO_GRADIENT) else ATOL_PARAMS
        np.testing.assert_allclose(multi[k], single[k], rtol=RTOL, atol=atol, err_msg=k)
    assert multi['step'] == 3
