"""The launcher of ``erasure.compare``: local jobs kept in flight, each on its own GPUs."""

from erasure.launch import LaunchConfig, run_local


class FakeJob:
    def __init__(self, executor, code):
        self.executor, self.code, self.polls = executor, code, 0

    def done(self):
        self.polls += 1
        if self.polls == 2:
            self.executor.running -= 1
        return self.polls >= 2

    def result(self):
        return self.code


class FakeExecutor:
    """Records how many jobs run at once and which GPUs each job was given."""

    def __init__(self):
        self.running = self.most = 0
        self.gpus, self.visible = [], None

    def update_parameters(self, visible_gpus):
        self.visible = visible_gpus

    def submit(self, function, arguments, threads):
        self.running += 1
        self.most = max(self.most, self.running)
        self.gpus.append(self.visible)
        return FakeJob(self, int(arguments[0]))


def test_local_launcher_keeps_parallel_jobs_in_flight_each_on_its_own_gpus():
    executor = FakeExecutor()
    codes = run_local(executor, [["0"], ["1"], ["0"], ["2"], ["0"]], LaunchConfig("local", parallel=2, gpus_per_job=2))
    assert codes == [0, 1, 0, 2, 0] and executor.most == 2
    assert executor.gpus[:2] == [[0, 1], [2, 3]] and all(g in ([0, 1], [2, 3]) for g in executor.gpus)
